"""How far do CA-GCL's contrastive losses carry what the voxel statistics hold? A fast probe.

The zero-shot AUC of the full model mixes two questions: does the image side encode a finding,
and do the report-text losses and the text head turn that into the right prompt direction? This
script answers the second one in minutes on a CPU, with no ViT:

* each anatomy of every cached volume is described by its fixed voxel statistics (the HU
  histogram, the volume share and, by default, the texture-filter histograms of
  :class:`~napari_ctvlp.engine.networks.voxel_statistics.VoxelStatistics`), computed once;
* the image side is one linear map of those statistics into the joint space, per anatomy
  (``--heads anatomy``) or shared (``--heads shared``), as the model's direct statistics path;
* the text side is the model's own :class:`~napari_ctvlp.engine.networks.text_encoder.TextEncoder`
  (frozen MiniLM, sentence pooling, ``--text-head linear|mlp``);
* training uses the pretraining losses (:func:`training.losses.local_contrastive_loss` on
  clinically augmented anatomy texts, optionally :func:`training.sentence_loss.sentence_contrastive_loss`);
* zero-shot AUC on the validation cache uses the engine's prompt templates, against a logistic
  regression on the same statistics (the supervised linear ceiling of the features).

Usage::

    python benchmarks/statistics_contrast_probe.py --cache TRAIN_CACHE --valid-cache HELDOUT_CACHE
        [--steps 800] [--heads anatomy|shared] [--text-head mlp|linear] [--sentence-weight 0]
        [--no-texture] [--global-weight 0] [--no-text-aug] [--stats-cache FILE.npz] [--threads 2]

Besides the AUCs it prints the two geometry figures of ``training.evaluate``: the std of the
per-template mean AUC over the 6 templates and the mean inter-anatomy text cosine of the held-out
anatomy texts, so the CA-GCL ablation (``--global-weight 0.1`` vs 0, ``--no-text-aug``) can be
read in minutes. ``--stats-cache`` keeps the extracted statistics (numbers in ``.npz``, sentences
in a ``.json`` beside it) for the next run.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def extract(cache: str, split: str, *, texture: bool) -> tuple[np.ndarray, list, np.ndarray]:
    """Per volume: fixed statistics ``[A, F]`` (log shares, rescaled as the direct path reads
    them), the per-anatomy sentences and the label row."""
    import torch

    from napari_ctvlp.engine.networks.config import HISTOGRAM_EDGES
    from napari_ctvlp.engine.networks.voxel_statistics import LOG_CENTRE, LOG_SCALE, VoxelStatistics
    from training.data import CachedCTDataset

    ds = CachedCTDataset(cache, split=split, augment_text=False)
    size = tuple(ds.image_size)
    vs = VoxelStatistics(edges=HISTOGRAM_EDGES, feature_channels=1, hidden_size=8, embed_dim=8,
                         image_size=size, cell=(8, 8, 8), texture=texture)
    k = vs.bins + 1 + vs.texture_bins
    dummy = torch.zeros(1, 1, *(s // 4 for s in size))
    feats, sentences, labels = [], [], []
    with torch.no_grad():
        for i in range(len(ds)):
            item = ds[i]
            stats, _ = vs.anatomy_inputs(item["image"][None], dummy, item["anatomy_masks"][None])
            feats.append(((stats[0, :, :k] - LOG_CENTRE) / LOG_SCALE).numpy())
            sentences.append(item["sentences"])
            labels.append(item["labels"].numpy())
    return np.stack(feats).astype(np.float32), sentences, np.stack(labels)


def extract_cached(args: argparse.Namespace) -> tuple[np.ndarray, list, np.ndarray, np.ndarray, list, np.ndarray]:
    """Training and held-out statistics, sentences and labels, from ``--stats-cache`` when it exists
    (written there otherwise)."""
    cache = Path(args.stats_cache) if args.stats_cache else None
    if cache is not None and cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            arrays = [z[k] for k in ("xt", "yt", "xv", "yv")]
        sentences = json.loads(cache.with_suffix(".json").read_text())
        return arrays[0], sentences["train"], arrays[1], arrays[2], sentences["valid"], arrays[3]
    xt, st, yt = extract(args.cache, args.split, texture=not args.no_texture)
    xv, sv, yv = extract(args.valid_cache, args.valid_split, texture=not args.no_texture)
    if cache is not None:
        np.savez(cache, xt=xt, yt=yt, xv=xv, yv=yv)
        cache.with_suffix(".json").write_text(json.dumps({"train": [[list(s) for s in v] for v in st],
                                                          "valid": [[list(s) for s in v] for v in sv]}))
    return xt, st, yt, xv, sv, yv


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True, help="prepared training cache")
    ap.add_argument("--split", default="train")
    ap.add_argument("--valid-cache", required=True, help="prepared held-out cache")
    ap.add_argument("--valid-split", default="valid")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--heads", choices=("anatomy", "shared"), default="anatomy")
    ap.add_argument("--text-head", choices=("mlp", "linear"), default="mlp")
    ap.add_argument("--sentence-weight", type=float, default=0.0)
    ap.add_argument("--no-texture", action="store_true", help="HU histogram and volume only")
    ap.add_argument("--global-weight", type=float, default=0.0, help="CA-GCL global group contrast weight")
    ap.add_argument("--no-text-aug", action="store_true", help="no sentence shuffle/subset augmentation")
    ap.add_argument("--aug-keep-findings", action="store_true",
                    help="the subset never drops a sentence that states a finding (training's "
                         "data.text_aug_keep_findings=true)")
    ap.add_argument("--stats-cache", default=None, help=".npz file keeping the extracted statistics")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from napari_ctvlp.engine.anatomy import ABNORMALITIES, ANATOMY_BY_NAME, ANATOMY_NAMES, PROMPT_TEMPLATES
    from napari_ctvlp.engine.networks.text_encoder import TextEncoder
    from napari_ctvlp.engine.networks.voxel_statistics import AnatomyLinear
    from napari_ctvlp.engine.zero_shot import fill_template
    from training.evaluate import inter_anatomy_similarities
    from training.losses import global_contrastive_loss, local_contrastive_loss
    from training.report_tags import affirms_finding
    from training.sentence_loss import sentence_batch, sentence_contrastive_loss
    from training.text_aug import augment_sentences

    keep = affirms_finding if args.aug_keep_findings else None

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    xt, st, yt, xv, sv, yv = extract_cached(args)
    print(f"statistics of {len(xt)} + {len(xv)} volumes ({xt.shape[-1]} per anatomy) in {time.perf_counter() - t0:.0f} s")
    a, f = xt.shape[1:]
    embed = 128
    image = AnatomyLinear(a, f, embed) if args.heads == "anatomy" else torch.nn.Linear(f, embed)
    text = TextEncoder("minilm", embed_dim=embed, trainable_layers=0, pooling="sentences", head=args.text_head,
                       max_length=256).train()
    scale = torch.nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
    params = list(image.parameters()) + list(text.projection.parameters()) + [scale]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    xt_t, xv_t = torch.from_numpy(xt), torch.from_numpy(xv)
    t0 = time.perf_counter()
    for step in range(args.steps):
        idx = rng.sample(range(len(xt)), args.batch_size)
        present = torch.tensor([[bool(st[i][j]) for j in range(a)] for i in idx])
        v = image(xt_t[idx])  # [B, A, E]
        texts = [" ".join(st[i][j]) if args.no_text_aug else augment_sentences(list(st[i][j]), generator=rng,
                                                                               keep=keep)
                 for i in idx for j in range(a) if st[i][j]]
        flat = text.encode(texts)
        t = v.new_zeros(v.shape).index_put(present.nonzero(as_tuple=True), flat)
        logit_scale = scale.exp().clamp(max=100.0)
        loss = local_contrastive_loss(v, t, present, logit_scale)
        if args.global_weight:
            loss = loss + args.global_weight * global_contrastive_loss(v, t, present, logit_scale,
                                                                       generator=generator)
        if args.sentence_weight:
            held = sentence_batch([st[i] for i in idx], present)
            loss = loss + args.sentence_weight * sentence_contrastive_loss(
                v, text.encode(list(held.sentences)), held, present, logit_scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)")

    names = [ab.name for ab in ABNORMALITIES]
    text.eval()
    zero, spread, ceiling, template_auc = [], [], [], []
    with torch.no_grad():
        emb_v = F.normalize(image(xv_t), dim=-1)
        for col, ab in enumerate(ABNORMALITIES):
            j = ANATOMY_NAMES.index(ab.anatomy)
            phrase = ANATOMY_BY_NAME[ab.anatomy].phrase
            keep = np.array([bool(s[j]) for s in sv])
            y = yv[keep, col]
            per_template = []
            for tp, tn in PROMPT_TEMPLATES:
                pair = text.encode([fill_template(tp, ab.term, phrase), fill_template(tn, ab.term, phrase)])
                p = (scale.exp().clamp(max=100.0) * emb_v[:, j] @ pair.T).softmax(-1)[:, 0].numpy()
                per_template.append(p[keep])
            ok = len(set(y)) > 1
            zero.append(roc_auc_score(y, np.mean(per_template, 0)) if ok else np.nan)
            template_auc.append([roc_auc_score(y, p) for p in per_template] if ok else [np.nan] * len(per_template))
            spread.append(np.std(template_auc[-1]) if ok else np.nan)
            if len(set(yt[:, col])) > 1 and ok:
                clf = LogisticRegression(max_iter=2000).fit(xt[:, j], yt[:, col])
                ceiling.append(roc_auc_score(yv[:, col], clf.predict_proba(xv[:, j])[:, 1]))
            else:
                ceiling.append(np.nan)
        owner = [j for s in sv for j in range(a) if s[j]]
        texts = [" ".join(s[j]) for s in sv for j in range(a) if s[j]]
        emb_t = torch.cat([text.encode(texts[i:i + 64]) for i in range(0, len(texts), 64)]).numpy()
    sims = inter_anatomy_similarities(emb_t, np.array(owner), seed=args.seed)
    print(f"{'finding':36s} zero-shot  LR ceiling")
    for name, z, c in zip(names, zero, ceiling):
        print(f"{name:36s} {z:9.3f}  {c:9.3f}")
    print(f"mean zero-shot AUC {np.nanmean(zero):.3f} (template std {np.nanmean(spread):.4f}); "
          f"LR ceiling {np.nanmean(ceiling):.3f}  [heads={args.heads} text_head={args.text_head} "
          f"sentence_weight={args.sentence_weight} steps={args.steps}]")
    print(f"per-template mean AUC std {np.nanstd(np.nanmean(template_auc, 0)):.4f}; mean inter-anatomy text "
          f"cosine {np.mean(sims):.3f} (std {np.std(sims):.3f})  [global_weight={args.global_weight} "
          f"text_aug={not args.no_text_aug}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
