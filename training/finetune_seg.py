"""MOSMOS-style segmentation fine-tuning of the built-in organ segmentation model.

``python -m training.finetune_seg --data phantom|DIR --out runs/NAME [--init-checkpoint CTVLP_DIR]
[--no-pta] [--steps N] [--seed S] [--device cpu|cuda]``

* data: ``phantom`` generates ``--train-phantoms`` training and ``--val-phantoms`` held-out phantoms
  in memory (:func:`napari_ctvlp.phantom.make_phantom`, fixed seeds independent of
  ``--seed``, so runs with different options see the same data); a directory is read in the
  CT-RATE layout of the phantom twin: every ``*.nii[.gz]`` outside ``masks/`` with its organ
  label map ``masks/<name>`` (organ or TotalSegmentator values); the last ``--val-count``
  volumes (sorted by name) are held out;
* every case is resampled once onto the model grid with the engine's ``preprocess`` (the same
  function the ``builtin`` backend uses); training draws random ROI crops;
* network: :class:`napari_ctvlp.engine.networks.seg_model.BuiltinSegNet`; with
  ``--init-checkpoint`` its ViT, tag decoder and tag embeddings come from a CTVLP checkpoint
  (``load_checkpoint``) and the grid spacing from that checkpoint's preprocessing;
* loss: ``L_seg + 0.8 L_pta`` (``training.losses.seg_pta_loss``: DiceCE each); ``--no-pta``
  removes the tag branch (plain UNETR-style baseline, same budget);
* evaluation on the held-out cases through the backend's own path (preprocess -> sliding window
  with overlap 0.5 -> nearest back to the input grid): Dice and HD95 (mm) per organ class with
  ``monai.metrics.DiceMetric`` / ``HausdorffDistanceMetric(percentile=95)``;
* outputs under ``--out``: ``metrics.json``, ``log.jsonl`` and ``checkpoint/`` (safetensors +
  ``config.json`` + ``MODEL_CARD.md``; no pickle), loadable by the ``builtin`` backend
  (``NAPARI_CTVLP_BUILTIN_SEG=runs/NAME/checkpoint``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from napari_ctvlp.engine.volume import CTVolume, ProgressCallback, report

logger = logging.getLogger(__name__)

TRAIN_SEED0 = 10_000
VAL_SEED0 = 20_000


def _int3(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.replace("x", ",").split(",") if p.strip()]
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected 3 positive sizes like 64,96,96, got {text!r}")
    return tuple(parts)  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(prog="python -m training.finetune_seg", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="'phantom' (generated in memory) or a CT-RATE-layout folder with masks/")
    p.add_argument("--out", required=True, help="run directory, e.g. runs/seg_pta")
    p.add_argument("--init-checkpoint", default=None, help="CTVLP checkpoint directory to initialise the encoder from")
    p.add_argument("--no-pta", action="store_true", help="no pixel-tag attention branch (baseline)")
    p.add_argument("--steps", type=int, default=300, help="optimiser steps (default 300)")
    p.add_argument("--seed", type=int, default=0, help="initialisation and crop seed (default 0)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (default 2e-3)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--pta-weight", type=float, default=0.8, help="weight of L_pta (MOSMOS: 0.8)")
    p.add_argument("--train-phantoms", type=int, default=24)
    p.add_argument("--val-phantoms", type=int, default=4)
    p.add_argument("--phantom-size", type=_int3, default=(96, 128, 128), help="D,H,W of generated phantoms")
    p.add_argument("--val-count", type=int, default=2, help="folder data: cases held out for evaluation")
    p.add_argument("--grid-size", type=_int3, default=(64, 96, 96),
                   help="model grid (a 336x384x352 mm chest box; default 64,96,96)")
    p.add_argument("--roi-size", type=_int3, default=(32, 48, 48), help="network input / sliding window (default 32,48,48)")
    p.add_argument("--patch-size", type=_int3, default=(8, 8, 8))
    p.add_argument("--hidden-size", type=int, default=96)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--feature-size", type=int, default=8)
    p.add_argument("--output-stride", type=int, default=2, choices=(1, 2))
    p.add_argument("--weights-dtype", default="float16", choices=("float32", "float16"))
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch default; 1 is much faster on a busy shared CPU)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--no-postprocess", action="store_true",
                   help="evaluate the raw argmax (no largest-component clean-up of single-piece organs)")
    p.add_argument("--eval-only", default=None, metavar="SEG_CHECKPOINT",
                   help="no training: evaluate this seg checkpoint on the held-out cases, write --out/metrics.json")
    return p


# ---------------------------------------------------------------------------------------- data
def load_cases(args: argparse.Namespace, progress: ProgressCallback | None = None
               ) -> tuple[list[tuple[CTVolume, np.ndarray]], list[tuple[CTVolume, np.ndarray]]]:
    """(train, validation) lists of ``(volume, organ labels)`` on the input grid."""
    if args.data == "phantom":
        from napari_ctvlp.phantom import make_phantom

        n_tr, n_va = args.train_phantoms, args.val_phantoms
        if n_tr < 0 or n_va < 1:
            raise ValueError(f"--train-phantoms must be >= 0 and --val-phantoms >= 1, got {n_tr}, {n_va}")
        out: list[tuple[CTVolume, np.ndarray]] = []
        seeds = [TRAIN_SEED0 + i for i in range(n_tr)] + [VAL_SEED0 + i for i in range(n_va)]
        for i, seed in enumerate(seeds):
            report(progress, i, len(seeds), "generating phantoms")
            ph = make_phantom(seed=seed, size=tuple(args.phantom_size))
            out.append((ph.volume, ph.organs))
        return out[:n_tr], out[n_tr:]
    root = Path(args.data)
    if not root.is_dir():
        raise ValueError(f"--data {root}: not 'phantom' and not a directory")
    from napari_ctvlp.engine.segmentation import from_label_file
    from napari_ctvlp.io import read_ct, read_labels

    skip = {"masks", "lesions", "segmentations"}  # label folders of the CT-RATE-layout phantom twin
    files = sorted(p for p in root.rglob("*.nii*") if not skip & set(p.relative_to(root).parts)
                   and p.name.endswith((".nii", ".nii.gz")))
    pairs = [(f, root / "masks" / f.name) for f in files if (root / "masks" / f.name).is_file()]
    if len(pairs) <= args.val_count or args.val_count < 1:
        raise ValueError(f"--data {root}: found {len(pairs)} volumes with masks/<name>; need more than --val-count {args.val_count} (>= 1)")
    cases = []
    for i, (ct, mask) in enumerate(pairs):
        report(progress, i, len(pairs), f"reading {ct.name}")
        vol = read_ct(ct)
        raw = np.asarray(read_labels(mask, like=vol, reorient=True))
        kind = "totalseg" if int(raw.max()) > 15 else "organ"
        cases.append((vol, from_label_file(raw, like=vol, kind=kind).labels))
    return cases[: -args.val_count], cases[-args.val_count:]


def to_grid(cases: list[tuple[CTVolume, np.ndarray]], pre_cfg: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each case on the model grid: ``(image float32 [-1, 1], class ids uint8)``."""
    from napari_ctvlp.engine.networks.seg_model import organs_to_classes
    from napari_ctvlp.engine.preprocess import preprocess

    out = []
    for vol, organs in cases:
        prepared = preprocess(vol, config=pre_cfg, organs=organs)
        out.append((prepared.image.astype(np.float32), organs_to_classes(prepared.organs)))
    return out


def sample_batch(grid_cases: list[tuple[np.ndarray, np.ndarray]], roi: tuple[int, int, int], batch_size: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random ROI crops ``[B, 1, *roi]`` (with a mild intensity jitter) and their class ids ``[B, 1, *roi]``."""
    images, targets = [], []
    for _ in range(batch_size):
        img, cls = grid_cases[int(rng.integers(len(grid_cases)))]
        start = [int(rng.integers(0, s - r + 1)) for s, r in zip(img.shape, roi)]
        sl = tuple(slice(a, a + r) for a, r in zip(start, roi))
        crop = img[sl] * np.float32(rng.uniform(0.95, 1.05)) + np.float32(rng.uniform(-0.03, 0.03))
        images.append(crop)
        targets.append(cls[sl])
    return np.stack(images)[:, None], np.stack(targets)[:, None]


# ----------------------------------------------------------------------------------------- eval
def evaluate(model: Any, pre_cfg: Any, cases: list[tuple[CTVolume, np.ndarray]], *, device: str = "cpu",
             keep_largest: bool = True, progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Dice and HD95 (mm) per organ class on the input grid of each held-out case.

    Returns ``{"per_class": {name: {"dice", "hd95_mm", "n"}}, "mean_dice", "mean_hd95_mm", "seconds_per_case"}``;
    a class absent from a case's reference is skipped for that case; HD95 is None when the
    prediction missed the class in every case.
    """
    import torch
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    from napari_ctvlp.engine.networks.seg_model import SEG_CLASSES, organs_to_classes
    from napari_ctvlp.engine.preprocess import preprocess, to_source_grid
    from napari_ctvlp.engine.segmentation.builtin import predict_classes

    k = len(SEG_CLASSES)
    dice_fn = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    hd_fn = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
    dices: list[list[float]] = [[] for _ in range(k - 1)]
    hds: list[list[float]] = [[] for _ in range(k - 1)]
    t0 = time.perf_counter()
    model.eval()
    for i, (vol, organs) in enumerate(cases):
        report(progress, i, len(cases), "evaluating")
        prepared = preprocess(vol, config=pre_cfg)
        classes = predict_classes(model, prepared.image, device=device, keep_largest=keep_largest)
        pred = to_source_grid(classes, prepared, order=0)
        ref = organs_to_classes(organs)
        p1 = torch.nn.functional.one_hot(torch.from_numpy(pred.astype(np.int64)), k).permute(3, 0, 1, 2)[None]
        r1 = torch.nn.functional.one_hot(torch.from_numpy(ref.astype(np.int64)), k).permute(3, 0, 1, 2)[None]
        d = dice_fn(p1, r1)[0]
        h = hd_fn(p1, r1, spacing=list(vol.spacing))[0]
        present = r1[0, 1:].flatten(1).any(1)
        for c in range(k - 1):
            if bool(present[c]):
                dices[c].append(float(d[c]))
                if math.isfinite(float(h[c])):
                    hds[c].append(float(h[c]))
    per_class = {}
    for c in range(k - 1):
        name = SEG_CLASSES[c + 1].name
        per_class[name] = {
            "dice": float(np.mean(dices[c])) if dices[c] else None,
            "hd95_mm": float(np.mean(hds[c])) if hds[c] else None,
            "n": len(dices[c]),
        }
    dvals = [v["dice"] for v in per_class.values() if v["dice"] is not None]
    hvals = [v["hd95_mm"] for v in per_class.values() if v["hd95_mm"] is not None]
    return {
        "per_class": per_class,
        "mean_dice": float(np.mean(dvals)) if dvals else None,
        "mean_hd95_mm": float(np.mean(hvals)) if hvals else None,
        "cases": len(cases),
        "postprocess": keep_largest,
        "seconds_per_case": (time.perf_counter() - t0) / max(1, len(cases)),
    }


# ---------------------------------------------------------------------------------------- model
def build_model(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    """(network, PreprocessConfig, init report) from the arguments (and the CTVLP checkpoint)."""
    from napari_ctvlp.engine.networks.seg_model import BuiltinSegNet, SegModelConfig, init_from_ctvlp
    from napari_ctvlp.engine.preprocess import PreprocessConfig

    use_pta = not args.no_pta
    if args.init_checkpoint:
        from napari_ctvlp.engine.checkpoint import load_checkpoint

        ckpt = load_checkpoint(args.init_checkpoint, device="cpu")
        config = SegModelConfig.from_ctvlp(ckpt.config, feature_size=args.feature_size, use_pta=use_pta,
                                           output_stride=args.output_stride)
        pre = PreprocessConfig.from_dict(ckpt.preprocessing)
        grid = tuple(max(g, r) for g, r in zip(args.grid_size, config.roi_size))
        if grid != pre.image_size:  # same voxel size as pre-training, a grid at least one ROI large
            pre = PreprocessConfig(**{**pre.to_dict(), "image_size": grid})
        model = BuiltinSegNet(config)
        init = {"from": str(args.init_checkpoint), **init_from_ctvlp(model, ckpt.model)}
        init["skipped"] = init["skipped"][:20]
        del ckpt
    else:
        config = SegModelConfig(roi_size=args.roi_size, patch_size=args.patch_size, hidden_size=args.hidden_size,
                                depth=args.depth, num_heads=4 if args.hidden_size % 4 == 0 else 1,
                                mlp_dim=2 * args.hidden_size, feature_size=args.feature_size, use_pta=use_pta,
                                output_stride=args.output_stride)
        pre = PreprocessConfig.for_image_size(args.grid_size)
        model = BuiltinSegNet(config)
        init = {"from": None}
    if any(g < r for g, r in zip(pre.image_size, config.roi_size)):
        raise ValueError(f"--grid-size {pre.image_size} must be at least --roi-size {config.roi_size} in every axis")
    return model, pre, init


def _lr(step: int, total: int, peak: float) -> float:
    warm = max(1, total // 10)
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return peak * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * t)))


def train(args: argparse.Namespace, *, progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Run one fine-tuning: returns the metrics dict (also written to ``--out/metrics.json``)."""
    import torch

    from napari_ctvlp.engine.segmentation.builtin import save_seg_checkpoint
    from training.losses import seg_pta_loss

    if args.steps < 1 or args.batch_size < 1:
        raise ValueError(f"--steps and --batch-size must be >= 1, got {args.steps}, {args.batch_size}")
    if args.data == "phantom" and args.train_phantoms < 1:
        raise ValueError(f"--train-phantoms must be >= 1 for training, got {args.train_phantoms}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    model, pre_cfg, init = build_model(args)
    model.to(args.device)
    train_cases, val_cases = load_cases(args, progress)
    grid_cases = to_grid(train_cases, pre_cfg)
    t_data = time.perf_counter() - t0
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    roi = model.config.roi_size
    losses: list[float] = []
    t1 = time.perf_counter()
    with open(out / "log.jsonl", "w") as log:
        for step in range(args.steps):
            model.train()
            for g in opt.param_groups:
                g["lr"] = _lr(step, args.steps, args.lr)
            x, y = sample_batch(grid_cases, roi, args.batch_size, rng)
            x_t = torch.from_numpy(x).to(args.device)
            y_t = torch.from_numpy(y.astype(np.int64)).to(args.device)
            res = model.forward_train(x_t)
            loss = seg_pta_loss(res.logits, res.pta_logits, y_t, pta_weight=args.pta_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            report(progress, step + 1, args.steps, "training")
            if (step + 1) % args.log_every == 0 or step == 0 or step + 1 == args.steps:
                rec = {"step": step + 1, "loss": float(np.mean(losses[-args.log_every:])),
                       "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t1}
                log.write(json.dumps(rec) + "\n")
                log.flush()
                logger.info("step %d loss %.4f", rec["step"], rec["loss"])
    t_train = time.perf_counter() - t1
    metrics = evaluate(model, pre_cfg, val_cases, device=args.device, keep_largest=not args.no_postprocess,
                       progress=progress)
    metrics.update({
        "use_pta": not args.no_pta, "steps": args.steps, "seed": args.seed, "init": init,
        "loss_first10": float(np.mean(losses[:10])), "loss_last10": float(np.mean(losses[-10:])),
        "seconds": {"data": t_data, "train": t_train, "total": time.perf_counter() - t0},
        "parameters": int(sum(p.numel() for p in model.parameters())),
    })
    training = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}
    training["train_cases"] = len(train_cases)
    training["phantom_seeds"] = {"train_from": TRAIN_SEED0, "val_from": VAL_SEED0} if args.data == "phantom" else None
    summary = {k: metrics[k] for k in ("per_class", "mean_dice", "mean_hd95_mm", "cases")}
    save_seg_checkpoint(model.cpu(), out / "checkpoint", preprocessing=pre_cfg.to_dict(), training=training,
                        metrics=summary, weights_dtype=args.weights_dtype, overwrite=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def evaluate_only(args: argparse.Namespace, *, progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Evaluate ``--eval-only`` on the held-out cases of ``--data``; writes ``--out/metrics.json``."""
    from napari_ctvlp.engine.preprocess import PreprocessConfig
    from napari_ctvlp.engine.segmentation.builtin import load_seg_checkpoint

    loaded = load_seg_checkpoint(args.eval_only, device=args.device)
    if args.data == "phantom":  # only the held-out phantoms are needed
        args = argparse.Namespace(**{**vars(args), "train_phantoms": 0})
    _, val_cases = load_cases(args, progress)
    metrics = evaluate(loaded.model, PreprocessConfig.from_dict(loaded.preprocessing), val_cases, device=args.device,
                       keep_largest=not args.no_postprocess, progress=progress)
    metrics.update({"checkpoint": str(args.eval_only), "use_pta": loaded.config.use_pta})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def format_table(metrics: dict[str, Any]) -> str:
    """Per-class Dice / HD95 as a small text table."""
    lines = [f"{'class':<12} {'Dice':>6} {'HD95 mm':>8}"]
    for name, v in metrics["per_class"].items():
        d = "-" if v["dice"] is None else f"{v['dice']:.3f}"
        h = "-" if v["hd95_mm"] is None else f"{v['hd95_mm']:.1f}"
        lines.append(f"{name:<12} {d:>6} {h:>8}")
    md, mh = metrics.get("mean_dice"), metrics.get("mean_hd95_mm")
    lines.append(f"{'mean':<12} {md if md is None else f'{md:.3f}':>6} {mh if mh is None else f'{mh:.1f}':>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        metrics = evaluate_only(args) if args.eval_only else train(args)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    print(format_table(metrics))
    print(f"wrote {Path(args.out) / 'metrics.json'}" + ("" if args.eval_only else f" and {Path(args.out) / 'checkpoint'}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
