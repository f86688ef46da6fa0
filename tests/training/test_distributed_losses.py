"""A 2-process gloo run of the losses equals one process on the concatenated batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

WORLD = 2
PER_RANK = 3


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    x = torch.randn(WORLD * PER_RANK, 3, 8, generator=g)
    t = torch.randn(WORLD * PER_RANK, 3, 8, generator=g)
    present = torch.rand(WORLD * PER_RANK, 3, generator=g) > 0.3
    present[:, 0] = True
    present[:, 2] = False
    present[4, 2] = True  # anatomy 2: one sample only, on rank 1
    weight = torch.randn(8, 8, generator=g)
    return x, t, present, weight


def _losses(x, t, present, weight, rank: int, world_size: int):
    """Loss terms of one batch; the image side passes through a shared 'parameter' ``weight``."""
    from training.losses import CAGCLLoss, image_report_contrastive_loss, local_contrastive_loss

    v = x @ weight
    cagcl = CAGCLLoss(num_groups=5, seed=3, init_temperature=0.1)
    out = cagcl(v, t, present, rank=rank, world_size=world_size)
    local = local_contrastive_loss(v, t, present, 10.0, rank=rank, world_size=world_size)
    irc = image_report_contrastive_loss(v.mean(1), t.mean(1), 10.0, rank=rank, world_size=world_size)
    return out.total + irc, torch.stack([out.total, out.local, out.global_, local, irc]).detach()


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        x, t, present, weight = _data()
        sl = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        x_local = x[sl].clone().requires_grad_(True)
        t_local = t[sl].clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        loss, parts = _losses(x_local, t_local, present[sl], w, rank, WORLD)
        loss.backward()
        w_grad = w.grad.clone()
        torch.distributed.all_reduce(w_grad)  # what DDP does: average parameter gradients
        w_grad /= WORLD
        torch.save({"parts": parts, "x_grad": x_local.grad, "t_grad": t_local.grad, "w_grad": w_grad},
                   Path(out_dir) / f"rank{rank}.pt")
        # both ranks finish their collectives before either tears gloo down: a rank that destroys
        # the group while the other is still in all_reduce aborts ("terminate called without an
        # active exception"), seen once under a loaded CPU
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_process_gloo_matches_single_process(tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    torch.multiprocessing.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)

    x, t, present, weight = _data()
    x.requires_grad_(True)
    t.requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss, parts = _losses(x, t, present, w, 0, 1)
    loss.backward()
    assert float(parts[2]) > 0  # the global term is active

    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        sl = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        torch.testing.assert_close(got["parts"], parts, rtol=1e-5, atol=1e-6)
        # the all_gather backward sums the (identical) full-batch losses of all ranks
        torch.testing.assert_close(got["x_grad"] / WORLD, x.grad[sl], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got["t_grad"] / WORLD, t.grad[sl], rtol=1e-4, atol=1e-6)
        # so DDP-style averaged parameter gradients equal the single-process ones
        torch.testing.assert_close(got["w_grad"], w.grad, rtol=1e-4, atol=1e-6)
