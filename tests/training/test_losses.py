"""Losses checked against hand computations in numpy/math."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.losses import (
    CAGCLLoss,
    clip_loss,
    global_contrastive_loss,
    global_group_indices,
    image_report_contrastive_loss,
    local_contrastive_loss,
    local_contrastive_terms,
    multilabel_recognition_loss,
    seg_pta_loss,
)


def _norm(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _infonce_np(a: np.ndarray, b: np.ndarray, scale: float, *, mean: bool = False) -> float:
    """CA-GCL's bidirectional InfoNCE: the two directions summed (``mean``: averaged, as CLIP)."""
    a, b = _norm(a), _norm(b)
    logits = scale * a @ b.T

    def ce(m: np.ndarray) -> float:
        m = m - m.max(axis=1, keepdims=True)
        logp = m - np.log(np.exp(m).sum(axis=1, keepdims=True))
        return float(-np.mean(np.diag(logp)))

    return (0.5 if mean else 1.0) * (ce(logits) + ce(logits.T))


def test_clip_loss_2x2_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    s = 2.0
    # image->text rows: [cos(a0,b0), cos(a0,b1)] = [1, 0.6]; [0, 0.8]
    i2t = -(math.log(math.exp(2 * 1.0) / (math.exp(2 * 1.0) + math.exp(2 * 0.6)))
            + math.log(math.exp(2 * 0.8) / (math.exp(2 * 0.0) + math.exp(2 * 0.8)))) / 2
    # text->image rows (columns of the above): [1, 0]; [0.6, 0.8]
    t2i = -(math.log(math.exp(2 * 1.0) / (math.exp(2 * 1.0) + math.exp(2 * 0.0)))
            + math.log(math.exp(2 * 0.8) / (math.exp(2 * 0.6) + math.exp(2 * 0.8)))) / 2
    assert float(clip_loss(a, b, s)) == pytest.approx(0.5 * (i2t + t2i), rel=1e-6)
    assert float(clip_loss(a, b, s, sum_directions=True)) == pytest.approx(i2t + t2i, rel=1e-6)


def test_local_loss_matches_hand_computation_and_excludes_absent():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(4, 3, 5)).astype(np.float32)
    t = rng.normal(size=(4, 3, 5)).astype(np.float32)
    present = np.array([[1, 1, 0], [0, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=bool)
    scale = 3.0
    expected = _infonce_np(v[[0, 2, 3], 0], t[[0, 2, 3], 0], scale) + _infonce_np(v[[0, 1, 2], 1], t[[0, 1, 2], 1], scale)
    # anatomy 2 is present in one sample only: it contributes 0
    got = local_contrastive_loss(torch.from_numpy(v), torch.from_numpy(t), torch.from_numpy(present), scale)
    assert float(got) == pytest.approx(expected, rel=1e-5)

    terms, counts = local_contrastive_terms(torch.from_numpy(v), torch.from_numpy(t), torch.from_numpy(present), scale)
    assert counts.tolist() == [3, 3, 1]
    assert float(terms[2]) == 0.0

    # embeddings of absent anatomies do not matter
    v2, t2 = v.copy(), t.copy()
    v2[~present] = 100.0 * rng.normal(size=v2[~present].shape)
    t2[~present] = rng.normal(size=t2[~present].shape)
    got2 = local_contrastive_loss(torch.from_numpy(v2), torch.from_numpy(t2), torch.from_numpy(present), scale)
    assert float(got2) == pytest.approx(float(got), rel=1e-6)


def test_local_loss_no_nan_when_nothing_to_contrast():
    v = torch.randn(2, 2, 4, requires_grad=True)
    t = torch.randn(2, 2, 4)
    present = torch.tensor([[True, False], [False, False]])
    loss = local_contrastive_loss(v, t, present, 10.0)
    loss.backward()
    assert float(loss) == 0.0 and torch.isfinite(v.grad).all()


def test_loss_decreases_when_pairs_align():
    g = torch.Generator().manual_seed(1)
    v = torch.randn(6, 2, 8, generator=g)
    present = torch.ones(6, 2, dtype=torch.bool)
    random_t = torch.randn(6, 2, 8, generator=g)
    aligned = local_contrastive_loss(v, v + 0.01 * random_t, present, 10.0)
    misaligned = local_contrastive_loss(v, random_t, present, 10.0)
    assert float(aligned) < 0.1 < float(misaligned)
    # and a few gradient steps on the text side reduce it
    t = random_t.clone().requires_grad_(True)
    opt = torch.optim.SGD([t], lr=1.0)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = local_contrastive_loss(v, t, present, 10.0) + global_contrastive_loss(
            v, t, present, 10.0, generator=torch.Generator().manual_seed(0))
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]


def test_group_indices_are_permutations_of_present_samples():
    present = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    idx = global_group_indices(present, num_groups=4, generator=torch.Generator().manual_seed(3))
    assert sorted(idx[:, 0].tolist()) == [0, 1, 2, 3]
    # anatomy 1 is in samples 0 and 2 only: each used exactly once, the other patients lack it
    assert sorted(idx[:2, 1].tolist()) == [0, 2] and idx[2:, 1].tolist() == [-1, -1]
    assert idx[:, 2].tolist() == [-1, -1, -1, -1]
    again = global_group_indices(present, num_groups=4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(idx, again)
    # anatomies are permuted independently: some seed gives differing columns
    seeds = [global_group_indices(torch.ones(5, 2, dtype=torch.bool), num_groups=5,
                                  generator=torch.Generator().manual_seed(s)) for s in range(5)]
    assert any(not torch.equal(s[:, 0], s[:, 1]) for s in seeds)


def test_global_loss_matches_hand_computation():
    rng = np.random.default_rng(2)
    v = rng.normal(size=(5, 3, 4)).astype(np.float32)
    t = rng.normal(size=(5, 3, 4)).astype(np.float32)
    present = np.ones((5, 3), dtype=bool)
    present[[1, 3], 2] = False
    present[:, 1] = False  # an anatomy absent everywhere is left out of the means
    idx = global_group_indices(torch.from_numpy(present), num_groups=4,
                               generator=torch.Generator().manual_seed(7)).numpy()
    vn, tn = _norm(v), _norm(t)
    # anatomy 2 is in 3 samples: each is used once, the fourth patient is composed without it
    assert (idx[:, 2] >= 0).sum() == 3 and sorted(idx[idx[:, 2] >= 0, 2].tolist()) == [0, 2, 4]
    gv = np.stack([np.mean([vn[idx[k, j], j] for j in (0, 2) if idx[k, j] >= 0], axis=0) for k in range(4)])
    gt = np.stack([np.mean([tn[idx[k, j], j] for j in (0, 2) if idx[k, j] >= 0], axis=0) for k in range(4)])
    expected = _infonce_np(gv, gt, 5.0)
    got = global_contrastive_loss(torch.from_numpy(v), torch.from_numpy(t), torch.from_numpy(present), 5.0,
                                  num_groups=4, generator=torch.Generator().manual_seed(7))
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_global_loss_drops_patients_without_anatomies():
    v, t = torch.randn(4, 2, 3), torch.randn(4, 2, 3)
    present = torch.tensor([[1, 0], [1, 1], [0, 0], [0, 0]], dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)
    # K = 4 synthetic patients, but only 2 can hold an anatomy (anatomy 0 is in 2 samples)
    got = global_contrastive_loss(v, t, present, 5.0, num_groups=4, generator=gen)
    idx = global_group_indices(present, num_groups=4, generator=torch.Generator().manual_seed(0))
    assert (idx[2:] == -1).all()
    vn, tn = _norm(v.numpy()), _norm(t.numpy())
    gv = np.stack([np.mean([vn[idx[k, j], j] for j in range(2) if idx[k, j] >= 0], axis=0) for k in range(2)])
    gt = np.stack([np.mean([tn[idx[k, j], j] for j in range(2) if idx[k, j] >= 0], axis=0) for k in range(2)])
    assert float(got) == pytest.approx(_infonce_np(gv, gt, 5.0), rel=1e-5)
    one = torch.tensor([[1, 0], [0, 0], [0, 0], [0, 0]], dtype=torch.bool)
    assert float(global_contrastive_loss(v, t, one, 5.0, num_groups=4, generator=gen)) == 0.0


def test_cagcl_module_total_and_switches():
    torch.manual_seed(0)
    v, t = torch.randn(4, 3, 8), torch.randn(4, 3, 8)
    present = torch.ones(4, 3, dtype=torch.bool)
    loss = CAGCLLoss(num_groups=4, seed=5, init_temperature=0.1)
    out = loss(v, t, present)
    assert float(out.logit_scale) == pytest.approx(10.0)
    assert float(out.total) == pytest.approx(float(out.local) + 0.1 * float(out.global_), rel=1e-6)
    assert float(out.local) == pytest.approx(float(out.per_anatomy.sum()), rel=1e-6)
    expected_glob = global_contrastive_loss(v, t, present, 10.0, num_groups=4,
                                            generator=torch.Generator().manual_seed(5))
    assert float(out.global_) == pytest.approx(float(expected_glob), rel=1e-5)
    out.total.backward()
    assert loss.log_logit_scale.grad is not None and torch.isfinite(loss.log_logit_scale.grad)
    assert set(out.log_dict()) >= {"loss/total", "loss/local", "loss/global", "logit_scale"}

    no_glob = CAGCLLoss(use_global=False)(v, t, present)
    assert float(no_glob.global_) == 0.0 and float(no_glob.total) == pytest.approx(float(no_glob.local))


def test_bad_arguments_raise():
    v = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="present"):
        local_contrastive_loss(v, v, torch.ones(2, 2, dtype=torch.bool), 1.0)
    with pytest.raises(ValueError, match="bool"):
        local_contrastive_loss(v, v, torch.ones(2, 3), 1.0)
    with pytest.raises(ValueError, match="logit_scale"):
        local_contrastive_loss(v, v, torch.ones(2, 3, dtype=torch.bool), -1.0)
    with pytest.raises(ValueError, match="generator"):
        global_contrastive_loss(v, v, torch.ones(2, 3, dtype=torch.bool), 1.0, rank=0, world_size=2)
    with pytest.raises(ValueError, match="num_groups"):
        CAGCLLoss(num_groups=1)


def test_image_report_contrastive_equals_clip_by_hand():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(3, 6)).astype(np.float32), rng.normal(size=(3, 6)).astype(np.float32)
    got = image_report_contrastive_loss(torch.from_numpy(a), torch.from_numpy(b), 7.0)
    assert float(got) == pytest.approx(_infonce_np(a, b, 7.0, mean=True), rel=1e-5)


def test_multilabel_weak_assume_negative_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, -3.0]])
    targets = torch.tensor([[1, 0, 0], [0, 1, 1]])
    gamma = 1.0 / (3 - 1)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    terms = []
    for row_x, row_y in zip(logits.tolist(), targets.tolist()):
        for x, y in zip(row_x, row_y):
            terms.append(-math.log(sig(x)) if y else -gamma * math.log(1 - sig(x)))
    assert float(multilabel_recognition_loss(logits, targets)) == pytest.approx(sum(terms) / 6, rel=1e-6)
    full = multilabel_recognition_loss(logits, targets, gamma=1.0)
    assert float(full) > float(multilabel_recognition_loss(logits, targets))
    with pytest.raises(ValueError, match="0 and 1"):
        multilabel_recognition_loss(logits, targets * 2)


def _dice_ce_np(logits: np.ndarray, target: np.ndarray) -> float:
    """MONAI DiceCELoss(softmax, one-hot) defaults: mean soft Dice over (batch, class) + mean CE."""
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    onehot = np.stack([(target == c) for c in range(logits.shape[1])], axis=1).astype(float)
    axes = tuple(range(2, logits.ndim))
    inter = (p * onehot).sum(axis=axes)
    denom = p.sum(axis=axes) + onehot.sum(axis=axes)
    dice = 1 - (2 * inter + 1e-5) / (denom + 1e-5)
    ce = -np.mean(np.log((p * onehot).sum(axis=1)))
    return float(dice.mean() + ce)


def test_seg_pta_loss_by_hand():
    rng = np.random.default_rng(5)
    seg = rng.normal(size=(2, 3, 2, 2, 2)).astype(np.float32)
    pta = rng.normal(size=(2, 3, 2, 2, 2)).astype(np.float32)
    target = rng.integers(0, 3, size=(2, 2, 2, 2))
    expected = _dice_ce_np(seg, target) + 0.8 * _dice_ce_np(pta, target)
    got = seg_pta_loss(torch.from_numpy(seg), torch.from_numpy(pta), torch.from_numpy(target))
    assert float(got) == pytest.approx(expected, rel=1e-4)
    only_seg = seg_pta_loss(torch.from_numpy(seg), None, torch.from_numpy(target)[:, None])
    assert float(only_seg) == pytest.approx(_dice_ce_np(seg, target), rel=1e-4)
    with pytest.raises(ValueError, match="labels must lie"):
        seg_pta_loss(torch.from_numpy(seg), None, torch.from_numpy(target) + 3)
