"""Can the image encoder see the 18 findings at all? Supervised probes on a prepared cache.

Zero-shot AUC is bounded by what the image side encodes. This script measures that bound with
the labels the cache already holds (CT-RATE ``multi_abnormality_labels`` or the phantom's):

* ``--mode linear`` (default when ``--checkpoint`` is given): the checkpoint's encoder is frozen;
  the per-anatomy embeddings (``A x E``) of every volume are computed once and one logistic
  regression per abnormality is fitted on the training split (scikit-learn). This is the usual
  linear probe of a pretrained model.
* ``--mode finetune``: the CTVLP image side (ViT + anatomy pooling) plus a linear head is trained
  with binary cross-entropy on the labels, from the checkpoint or from scratch. On a small model
  and budget this is the supervised ceiling of that architecture and budget.

Prints per-abnormality validation AUC and the mean (finetune: every ``--eval-every`` steps).

Usage::

    python benchmarks/image_encoder_probe.py --cache CACHE [--checkpoint DIR] [--mode linear|finetune]
        [--steps 500] [--lr 1e-3] [--batch-size 16] [--preset phantom_cpu] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _load_split(cache: str, split: str, anatomies, patch_size, token_weighting: str = "any", limit=None):
    """All volumes of one split as tensors: images, token masks, labels (``-1`` unknown)."""
    import torch

    from training.data import CachedCTDataset

    ds = CachedCTDataset(cache, split=split, augment_text=False, anatomies=anatomies, patch_size=patch_size,
                         token_weighting=token_weighting)
    items = [ds[i] for i in range(min(len(ds), limit or len(ds)))]
    return (torch.stack([it["image"] for it in items]), torch.stack([it["token_masks"] for it in items]),
            torch.stack([it["labels"] for it in items]).float(), torch.stack([it["anatomy_masks"] for it in items]))


def _aucs(labels: np.ndarray, scores: np.ndarray) -> list[float]:
    """AUC per abnormality, as ``training.evaluate`` computes it (unknown ``-1`` labels left out;
    NaN where the validation split has one class only)."""
    from training.evaluate import binary_metrics

    return [binary_metrics(labels[:, k], scores[:, k])["auc"] for k in range(labels.shape[1])]


def _print_table(aucs: list[float], title: str) -> None:
    from napari_ctvlp.engine.anatomy import ABNORMALITIES

    print(f"\n{title}")
    print("| abnormality | anatomy | AUC |\n|---|---|---|")
    for ab, a in zip(ABNORMALITIES, aucs):
        print(f"| {ab.name} | {ab.anatomy} | {a:.3f} |")
    print(f"| **mean** | | **{np.nanmean(aucs):.3f}** |")


def _embed(model, images, token_masks, masks, batch: int = 16) -> np.ndarray:
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            pooled = model.embed_image(images[i:i + batch], masks[i:i + batch],
                                       token_masks=token_masks[i:i + batch]).anatomies
            out.append(pooled.embeddings.flatten(1).float().numpy())
    return np.concatenate(out)


def linear_probe(model, train, valid) -> list[float]:
    """Frozen encoder; one logistic regression per abnormality on the flattened anatomy embeddings."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    model.eval()
    xt, xv = _embed(model, train[0], train[1], train[3]), _embed(model, valid[0], valid[1], valid[3])
    scaler = StandardScaler().fit(xt)
    xt, xv = scaler.transform(xt), scaler.transform(xv)
    yt, yv = train[2].numpy(), valid[2].numpy()
    scores = np.zeros_like(yv)
    for k in range(yt.shape[1]):
        known = yt[:, k] >= 0
        if len(np.unique(yt[known, k])) < 2:
            scores[:, k] = 0.0
            continue
        clf = LogisticRegression(C=0.1, max_iter=5000).fit(xt[known], yt[known, k])
        scores[:, k] = clf.decision_function(xv)
    return _aucs(yv, scores)


def finetune_probe(model, train, valid, *, steps: int, lr: float, batch_size: int, eval_every: int,
                   seed: int, head_lr_factor: float = 30.0) -> list[float]:
    """Train ViT (+ dense fusion) + anatomy pooling + a linear head with BCE on the labels; AUC every ``eval_every``."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    cfg = model.config
    head = nn.Linear(len(cfg.anatomies) * cfg.embed_dim, train[2].shape[1])
    extra = [*(model.dense.parameters() if model.dense is not None else ()),
             *(model.statistics.parameters() if model.statistics is not None else ())]
    params = [*model.vit.parameters(), *extra, *model.anatomy_pooling.parameters()]
    # the head reads unit-norm anatomy embeddings: at the encoder's rate its weights grow too slowly to
    # give confident logits within a probe's budget (pretraining has a learned logit scale instead)
    opt = torch.optim.AdamW([{"params": params}, {"params": head.parameters(), "lr": lr * head_lr_factor}],
                            lr=lr, weight_decay=0.05)
    gen = torch.Generator().manual_seed(seed)
    aucs: list[float] = []
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        model.train()
        idx = torch.randint(0, len(train[0]), (batch_size,), generator=gen)
        y = train[2][idx]
        pooled = model.embed_image(train[0][idx], train[3][idx], token_masks=train[1][idx]).anatomies
        logits = head(pooled.embeddings.flatten(1))
        known = (y >= 0).float()
        loss = (nn.functional.binary_cross_entropy_with_logits(logits, y.clamp_min(0), reduction="none")
                * known).sum() / known.sum().clamp_min(1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            model.eval()
            with torch.no_grad():
                xv = torch.from_numpy(_embed(model, valid[0], valid[1], valid[3]))
                scores = head(xv).numpy()
            aucs = _aucs(valid[2].numpy(), scores)
            print(f"step {step}/{steps}  {time.perf_counter() - t0:.0f} s  loss {float(loss.detach()):.3f}  "
                  f"mean AUC {np.nanmean(aucs):.3f}", flush=True)
    return aucs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", required=True, help="folder written by python -m training.prepare")
    p.add_argument("--train-split", default="train")
    p.add_argument("--valid-split", default="valid")
    p.add_argument("--checkpoint", default=None, help="CTVLP checkpoint (default: a fresh --preset model)")
    p.add_argument("--preset", default="phantom_cpu", choices=("tiny", "phantom_cpu", "vit_b"))
    p.add_argument("--mode", choices=("linear", "finetune"), default=None,
                   help="default: linear with --checkpoint, finetune without")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--limit", type=int, default=None, help="use at most this many training volumes")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field of the fresh model (JSON value), e.g. statistics_edges=[]")
    args = p.parse_args(argv)

    import torch

    from napari_ctvlp.engine.checkpoint import load_checkpoint
    from napari_ctvlp.engine.networks import CTVLP, CTVLPConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    mode = args.mode or ("linear" if args.checkpoint else "finetune")
    if args.checkpoint:
        model = load_checkpoint(args.checkpoint).model.float()
        source = f"checkpoint {args.checkpoint}"
    else:
        torch.manual_seed(args.seed)
        import json

        overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
        model = CTVLP(getattr(CTVLPConfig, args.preset)(**overrides))
        source = f"fresh CTVLPConfig.{args.preset}() (random init)"
    cfg = model.config
    train = _load_split(args.cache, args.train_split, cfg.anatomies, cfg.feature_patch, cfg.token_weighting, args.limit)
    valid = _load_split(args.cache, args.valid_split, cfg.anatomies, cfg.feature_patch, cfg.token_weighting)
    print(f"{mode} probe of {source}; {len(train[0])} train / {len(valid[0])} valid volumes "
          f"of {args.cache}; torch threads {torch.get_num_threads()}")
    if mode == "linear":
        aucs = linear_probe(model, train, valid)
        title = "Linear probe (frozen encoder), validation AUC"
    else:
        aucs = finetune_probe(model, train, valid, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                              eval_every=args.eval_every, seed=args.seed)
        title = f"Supervised fine-tuning, {args.steps} steps of batch {args.batch_size}, lr {args.lr}: validation AUC"
    _print_table(aucs, title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
