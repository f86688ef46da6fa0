"""Vision-language pre-training: CA-GCL (local + global anatomy contrast) + MOSMOS terms.

``python -m training.pretrain --config CFG.yaml [--set key=value ...] [--resume] [--no-global]
[--no-text-aug] [--no-mosmos] [--name NAME] [--out runs/]``

Multi-GPU / multi-node: ``torchrun --nproc-per-node 4 -m training.pretrain --config ...``
(process group from ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; nccl on CUDA, gloo on CPU). The batch
size of the config is per process. Rank 0 alone logs (console, TensorBoard, ``metrics.jsonl``)
and writes checkpoints; every rank writes its own RNG state.

Loss: ``sum_j L_loc_j + global_weight * L_glo`` (:class:`training.losses.CAGCLLoss`) plus, with
MOSMOS on, ``irc_weight * IRC + mlr_weight * WAN-BCE`` of the tag decoder. The image side of IRC is
the normalised mean of the token embeddings. With ``loss.sentence_weight > 0``, plus that weight
times the sentence-to-anatomy contrast (:mod:`training.sentence_loss`).

Run folder ``<out>/<name>/``: ``params.json``, ``metrics.jsonl`` (one line per step),
``tb/`` (TensorBoard), ``checkpoints/step_XXXXXXX/`` (model checkpoint + exact training state),
``latest.json`` (pointer to the newest complete checkpoint), ``final/`` (the last model).
SIGTERM (e.g. a cluster pre-emption) makes the run save at the next step boundary and exit 0;
``--resume`` continues exactly (same losses as an uninterrupted run on CPU).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.optim import lr_lambda_factory, param_groups
from training.params import TrainParams, load_params

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` did."""

    run_dir: Path
    final_checkpoint: Path | None
    last_checkpoint: Path | None
    step: int
    total_steps: int
    interrupted: bool
    last_loss: float | None


class TrainStep(nn.Module):
    """Everything the losses need from one batch, in one ``forward`` (so DDP sees every parameter)."""

    def __init__(self, model: nn.Module, *, mosmos: bool, sentences: bool = False) -> None:
        super().__init__()
        self.model = model
        self.mosmos = mosmos
        self.sentences = sentences

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        m = self.model
        image = m.embed_image(batch["image"], batch["anatomy_masks"], token_masks=batch.get("token_masks"))
        tokens, pooled = image.tokens, image.anatomies
        present = batch["present"] & pooled.present
        b, a, e = pooled.embeddings.shape
        sentences = m.config.text_pooling == "sentences"
        if not batch["text_input_ids"].shape[0]:
            flat = pooled.embeddings.new_zeros((0, e))
        elif sentences:
            flat = m.encode_text(batch["present_texts"])
        else:
            flat = m.encode_text_tokens(batch["text_input_ids"], batch["text_attention_mask"])
        index = batch["text_index"]
        text = pooled.embeddings.new_zeros((b, a, e)).to(flat.dtype)
        has = index >= 0
        text = text.index_put((has.nonzero(as_tuple=True)), flat[index[has]])
        # the temperature is read inside forward so DDP sees logit_scale used by this step's graph
        out = {"image_emb": pooled.embeddings, "text_emb": text, "present": present,
               "logit_scale": m.logit_scale.exp().clamp(max=100.0)}
        if self.mosmos:
            out["image_global"] = F.normalize(m.token_embeddings(tokens).mean(dim=1), dim=-1)
            out["report_emb"] = m.encode_text(batch["reports"]) if sentences else \
                m.encode_text_tokens(batch["report_input_ids"], batch["report_attention_mask"])
            out["tag_logits"] = m.decode_tags(tokens).logits
        if self.sentences:
            from training.sentence_loss import sentence_batch

            held = sentence_batch(batch["anatomy_sentences"], present)
            out["sentence_batch"] = held
            out["sentence_emb"] = m.encode_text(list(held.sentences)) if held.sentences else flat[:0]
        return out


def supervision_record(tags: tuple[str, ...], *, mosmos: bool) -> dict[str, Any]:
    """What the run learnt from besides image-text pairs, stored in every checkpoint.

    The label CSV is never read for training; with MOSMOS on, tag targets come from the report
    text, and the finding terms among the tags get that weak (report-derived) supervision.
    """
    from training.report_tags import FINDING_TERMS

    finding_tags = [t for t in tags if t.lower() in FINDING_TERMS] if mosmos else []
    return {"label_file_used": False, "tag_targets": "report_text" if mosmos else None,
            "finding_tags_from_report_text": finding_tags}


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _complete(path: Path) -> bool:
    return (path / "model.safetensors").is_file() and (path / "training_state.json").is_file()


def _latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``latest.json`` names; if a kill interrupted the swap of a re-saved checkpoint,
    its previous copy (``.<name>.old``), else the newest complete ``checkpoints/step_*``."""
    pointer = run_dir / "latest.json"
    if not pointer.is_file():
        return None
    path = run_dir / json.loads(pointer.read_text())["checkpoint"]
    if _complete(path):
        return path
    previous = path.with_name(f".{path.name}.old")
    if _complete(previous):
        return previous
    steps = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if _complete(p)) \
        if (run_dir / "checkpoints").is_dir() else []
    return steps[-1] if steps else None


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop ``metrics.jsonl`` lines after ``step`` (they were logged after the last checkpoint)."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in keep))


def train(params: TrainParams, *, run_dir: str | Path, resume: bool = False, stop_after: int | None = None) -> TrainResult:
    """Run (or resume) pre-training as configured; see the module docstring.

    Args:
        params: resolved parameters (:func:`training.params.load_params`).
        run_dir: the run folder.
        resume: continue from ``run_dir/latest.json`` (error if there is none).
        stop_after: stop (with a checkpoint) after this global step, as if interrupted; the
            learning-rate schedule still follows the full budget.
    """
    from torch.utils.data import DataLoader, DistributedSampler

    from napari_ctvlp.engine.checkpoint import save_checkpoint
    from napari_ctvlp.engine.networks.ctvlp import CTVLP
    from training.data import CachedCTDataset, make_collate
    from training.distributed import init_distributed
    from training.losses import CAGCLLoss, image_report_contrastive_loss, multilabel_recognition_loss
    from training.prepare import default_preprocess_config
    from training.train_state import load_training_state, save_training_state

    run_dir = Path(run_dir)
    tp, op, lp, dp = params.train, params.optim, params.loss, params.data
    if not dp.get("cache"):
        raise ValueError("data.cache is not set: pass --set data.cache=/path/to/cache (from training.prepare)")
    # fail early, before building the model
    from training.data import load_manifest

    load_manifest(dp["cache"], dp.get("split", "train"))
    if resume and _latest_checkpoint(run_dir) is None:
        raise ValueError(f"--resume: {run_dir} has no checkpoint (latest.json)")
    if not resume and (run_dir / "metrics.jsonl").exists():
        raise ValueError(f"{run_dir} already holds a run; pass --resume or choose another --name")
    dist = init_distributed(device=tp.get("device"))
    is_main = dist.is_main
    device = torch.device(dist.device)
    seed = int(tp["seed"])
    _seed_all(seed + dist.rank)
    if tp.get("deterministic"):
        torch.use_deterministic_algorithms(True, warn_only=True)

    config = params.model
    if tp.get("gradient_checkpointing") and not config.gradient_checkpointing:
        config = config.replace(gradient_checkpointing=True)
    model = CTVLP(config).to(device)
    mosmos = bool(lp["mosmos"])
    sentence_weight = float(lp.get("sentence_weight") or 0.0)
    step_module: nn.Module = TrainStep(model, mosmos=mosmos, sentences=sentence_weight > 0)
    if dist.distributed:
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None,
            # some parameters may get no gradient in a step (the tag decoder without MOSMOS, an
            # anatomy absent from every sample of the batch): DDP must look for them each step
            find_unused_parameters=True,
        )
    cagcl = CAGCLLoss(use_global=bool(lp["use_global"]), global_weight=float(lp["global_weight"]),
                      num_groups=lp.get("num_groups"), seed=seed, learn_temperature=False)

    dataset = CachedCTDataset(dp["cache"], split=dp.get("split", "train"), augment_text=bool(dp["augment_text"]),
                              keep_findings=bool(dp.get("text_aug_keep_findings", False)),
                              seed=seed, anatomies=config.anatomies, tags=config.tags if mosmos else None,
                              patch_size=config.feature_patch, token_weighting=config.token_weighting,
                              augment_image=bool(dp.get("augment_image", False)))
    cache_pre = dict(dataset.preprocess)
    expected = default_preprocess_config(config.image_size, params.preprocess.get("spacing_mm"),
                                         params.preprocess.get("hu_window")).to_dict()
    if tuple(cache_pre["image_size"]) != config.image_size:
        raise ValueError(f"cache {dp['cache']} was prepared for image_size {cache_pre['image_size']}, "
                         f"the model needs {list(config.image_size)}")
    if cache_pre != expected:
        logger.warning("cache preprocessing %s differs from the config's %s; the cache's is recorded", cache_pre, expected)
    batch_size = int(op["batch_size"])
    sampler = DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                 seed=seed, drop_last=True)
    steps_per_epoch = len(sampler) // batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"{len(dataset)} samples over {dist.world_size} process(es) do not fill one batch of {batch_size}")
    total_steps = int(op["epochs"]) * steps_per_epoch
    if op.get("max_steps"):
        total_steps = min(total_steps, int(op["max_steps"]))
    collate = make_collate(model.tokenizer, max_length=config.text_max_length,
                           report_max_length=int(dp.get("report_max_length") or config.text_max_length))

    text_lr = op.get("text_lr")
    head_lr = op.get("head_lr")
    groups = param_groups(model, float(op["weight_decay"]), text_lr=None if text_lr is None else float(text_lr),
                          lr=float(op["lr"]), head_lr=None if head_lr is None else float(head_lr))
    optimizer = torch.optim.AdamW(groups, lr=float(op["lr"]), betas=tuple(op["betas"]))
    warmup = int(op["warmup_steps"])
    text_warmup = int(op["text_warmup_steps"]) if op.get("text_warmup_steps") is not None else warmup
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [
        lr_lambda_factory(text_warmup if g["name"].startswith("text_") else warmup, total_steps,
                          float(op["min_lr_ratio"])) for g in groups])
    generators = {"cagcl": cagcl.generator}

    step = 0
    metrics_path = run_dir / "metrics.jsonl"
    if resume:
        ckpt = _latest_checkpoint(run_dir)
        if ckpt is None:
            raise ValueError(f"--resume: {run_dir} has no checkpoint (latest.json)")
        from safetensors.torch import load_file

        weights = load_file(str(ckpt / "model.safetensors"), device=str(device))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected or set(missing) - set(model.frozen_state_names()):
            raise ValueError(f"--resume: {ckpt} does not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
        progress = load_training_state(ckpt, optimizer=optimizer, scheduler=scheduler, rank=dist.rank,
                                       generators=generators)
        step = int(progress["step"])
        if is_main:
            _truncate_metrics(metrics_path, step)
            logger.info("resumed %s at step %d of %d", ckpt, step, total_steps)

    writer = None
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "params.json").write_text(json.dumps(params.to_dict(), indent=1))
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(run_dir / "tb"))
        except ImportError:  # pragma: no cover - tensorboard is in the training extra
            logger.warning("tensorboard is not installed: no TensorBoard logs (pip install tensorboard)")

    stop_flag = {"signal": False}

    def _on_sigterm(signum: int, frame: Any) -> None:
        stop_flag["signal"] = True

    old_handler = signal.signal(signal.SIGTERM, _on_sigterm) if threading_main() else None
    preprocessing = cache_pre
    training_record = {"params": params.to_dict(), "data": str(dp["cache"]), "world_size": dist.world_size,
                       "supervision": supervision_record(config.tags, mosmos=mosmos)}

    def _save(tag: str, *, final: bool = False) -> Path:
        # Written into a staging folder beside the target and swapped in whole, so the checkpoint
        # latest.json points to is never deleted before its replacement is complete (a re-save of the
        # same step after a resume used to rmtree it first; a kill then left nothing to resume from).
        target = run_dir / ("final" if final else f"checkpoints/{tag}")
        staging = target.with_name(f".{target.name}.partial")
        if is_main:
            if staging.exists():
                shutil.rmtree(staging)
            save_checkpoint(model, staging, preprocessing=preprocessing,
                            training={**training_record, "step": step, "total_steps": total_steps}, overwrite=True)
        if dist.distributed:
            torch.distributed.barrier()
        if not final:
            save_training_state(staging, optimizer=optimizer, scheduler=scheduler, rank=dist.rank,
                                generators=generators,
                                progress={"step": step, "epoch": step // steps_per_epoch, "total_steps": total_steps})
            if dist.distributed:
                torch.distributed.barrier()
        if is_main:
            previous = target.with_name(f".{target.name}.old")
            if previous.exists():
                shutil.rmtree(previous)
            if target.exists():
                os.replace(target, previous)
            os.replace(staging, target)
            if not final:
                tmp = run_dir / "latest.json.tmp"
                tmp.write_text(json.dumps({"checkpoint": f"checkpoints/{tag}", "step": step}))
                os.replace(tmp, run_dir / "latest.json")
            shutil.rmtree(previous, ignore_errors=True)
            if not final:
                olds = sorted(p for p in (run_dir / "checkpoints").iterdir()
                              if p.is_dir() and p != target and not p.name.startswith("."))
                for old in olds[: max(0, len(olds) - 1)]:  # keep the newest two
                    shutil.rmtree(old, ignore_errors=True)
        if dist.distributed:
            torch.distributed.barrier()
        return target

    use_amp = device.type == "cuda" and bool(tp.get("bf16", True))
    bar = None
    if is_main:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=step, unit="step", desc=run_dir.name, disable=None)
    interrupted = False
    last_loss: float | None = None
    last_ckpt: Path | None = None
    every = int(tp["checkpoint_every"])
    log_every = max(1, int(tp["log_every"]))
    step_module.train()
    t_last = time.perf_counter()
    while step < total_steps and not interrupted:
        epoch, skip = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        indices = list(sampler)[skip * batch_size: steps_per_epoch * batch_size]
        loader = DataLoader(dataset, batch_size=batch_size, sampler=indices, collate_fn=collate,
                            num_workers=int(dp.get("num_workers", 0)), drop_last=True,
                            pin_memory=device.type == "cuda", persistent_workers=False,
                            generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                out = step_module(batch)
            f32 = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in out.items()}
            scale = f32["logit_scale"]
            parts = cagcl(f32["image_emb"], f32["text_emb"], f32["present"], logit_scale=scale,
                          rank=dist.rank, world_size=dist.world_size)
            loss = parts.total
            logs = {"loss/local": float(parts.local.detach()), "loss/global": float(parts.global_.detach())}
            if mosmos:
                irc = image_report_contrastive_loss(f32["image_global"], f32["report_emb"], scale,
                                                    rank=dist.rank, world_size=dist.world_size)
                mlr = multilabel_recognition_loss(f32["tag_logits"], batch["tag_targets"].float())
                loss = loss + float(lp["irc_weight"]) * irc + float(lp["mlr_weight"]) * mlr
                logs.update({"loss/irc": float(irc.detach()), "loss/mlr": float(mlr.detach())})
            if sentence_weight > 0:
                from training.sentence_loss import sentence_contrastive_loss

                sent = sentence_contrastive_loss(f32["image_emb"], f32["sentence_emb"], f32["sentence_batch"],
                                                 f32["present"], scale)
                loss = loss + sentence_weight * sent
                logs["loss/sentence"] = float(sent.detach())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {float(loss)} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if op.get("grad_clip"):
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(op["grad_clip"]))
            optimizer.step()
            scheduler.step()
            step += 1
            last_loss = float(loss.detach())
            if is_main:
                logs.update({"loss/total": last_loss, "lr": scheduler.get_last_lr()[0], "logit_scale": float(scale.detach()),
                             **{f"lr/{g['name']}": g["lr"] for g in optimizer.param_groups if g["name"].startswith("text_")}})
                with open(metrics_path, "a") as fh:
                    fh.write(json.dumps({"step": step, **logs}) + "\n")
                if writer is not None:
                    for k, v in logs.items():
                        writer.add_scalar(k, v, step)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{last_loss:.3f}")
                if step % log_every == 0:
                    now = time.perf_counter()
                    logger.info("step %d/%d loss %.4f (%s) %.2fs/step", step, total_steps, last_loss,
                                ", ".join(f"{k.split('/')[-1]} {v:.3f}" for k, v in logs.items() if k.startswith("loss/")
                                          and k != "loss/total"), (now - t_last) / log_every)
                    t_last = now
            stop = stop_flag["signal"] or (stop_after is not None and step >= stop_after)
            if dist.distributed:
                flag = torch.tensor([float(stop)], device=device)
                torch.distributed.all_reduce(flag)
                stop = bool(flag.item() > 0)
            if stop and step < total_steps:
                last_ckpt = _save(f"step_{step:07d}")
                logger.info("stopping at step %d (%s); resume with --resume", step,
                            "SIGTERM" if stop_flag["signal"] else "--stop-after")
                interrupted = True
                break
            if every > 0 and step % every == 0 and step < total_steps:
                last_ckpt = _save(f"step_{step:07d}")
            if step >= total_steps:
                break
    final = None
    if not interrupted:
        last_ckpt = _save(f"step_{step:07d}")
        final = _save("final", final=True)
        if is_main:
            logger.info("finished %d steps; final checkpoint %s", step, final)
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.close()
    if old_handler is not None:
        signal.signal(signal.SIGTERM, old_handler)
    return TrainResult(run_dir, final, last_ckpt, step, total_steps, interrupted, last_loss)


def threading_main() -> bool:
    """True in the main thread (only there can signal handlers be installed)."""
    import threading

    return threading.current_thread() is threading.main_thread()


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of ``python -m training.pretrain``."""
    p = argparse.ArgumentParser(prog="python -m training.pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML parameter file (configs/*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a parameter, e.g. --set optim.lr=3e-4 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run <out>/<name> from its latest checkpoint")
    p.add_argument("--no-global", action="store_true", help="ablation: local anatomy contrast only")
    p.add_argument("--no-text-aug", action="store_true", help="ablation: no sentence shuffle/subset augmentation")
    p.add_argument("--no-mosmos", action="store_true", help="ablation: no image-report / tag recognition terms")
    p.add_argument("--name", default=None, help="run name (default: the config file name)")
    p.add_argument("--out", default="runs", help="parent folder of runs (default: runs/)")
    p.add_argument("--cache", default=None, help="prepared cache (same as --set data.cache=...)")
    p.add_argument("--max-steps", type=int, default=None, help="training budget in steps (same as --set optim.max_steps=N)")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop with a resumable checkpoint after this step (the schedule keeps the full budget)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m training.pretrain``; returns the exit code."""
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=(logging.DEBUG if args.verbose else logging.INFO) if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    updates: dict[str, dict[str, Any]] = {"loss": {}, "data": {}, "optim": {}, "train": {}}
    if args.no_global:
        updates["loss"]["use_global"] = False
    if args.no_mosmos:
        updates["loss"]["mosmos"] = False
    if args.no_text_aug:
        updates["data"]["augment_text"] = False
    if args.cache:
        updates["data"]["cache"] = args.cache
    if args.max_steps:
        updates["optim"]["max_steps"] = args.max_steps
    if args.device:
        updates["train"]["device"] = args.device
    try:
        params = load_params(args.config, overrides=args.set, updates=updates)
        name = args.name or Path(args.config).stem
        result = train(params, run_dir=Path(args.out) / name, resume=args.resume, stop_after=args.stop_after)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    logger.info("run %s: step %d/%d%s", result.run_dir, result.step, result.total_steps,
                " (interrupted, resumable)" if result.interrupted else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
