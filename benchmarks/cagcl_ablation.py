"""CA-GCL factorial ablation: full, no-global, no-aug, no-both, over seeds, at one budget; prints the table.

Each cell is a real ``python -m training.pretrain`` run (same data, budget and seed across the four
variants) followed by ``python -m training.evaluate`` on the held-out split. The table gives, per
variant and seed: mean zero-shot AUC, AUC std over prompt templates, the mean inter-anatomy text
cosine, and the last logged local loss against its chance level (sum over anatomies of
``2 ln N_j``, CA-GCL's two InfoNCE directions summed), so one can see whether the run left chance.
Runs are resumable (an existing finished run is evaluated again, not retrained).

Usage::

    python benchmarks/cagcl_ablation.py --cache CACHE --out runs/ablation --steps 200 --seeds 0 1 \\
        [--eval-data HELDOUT_CACHE] [--parallel 2] [--set optim.batch_size=16 ...] [--no-mosmos]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, tuple[str, ...]] = {
    "full": (),
    "no-global": ("--no-global",),
    "no-aug": ("--no-text-aug",),
    "no-both": ("--no-global", "--no-text-aug"),
}


def _run(cmd: list[str], log: Path) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS", "1")}
    with log.open("a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        return subprocess.call(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)


def run_cell(variant: str, seed: int, args: argparse.Namespace) -> dict:
    """Train (unless finished) and evaluate one (variant, seed) cell."""
    name = f"{variant.replace('-', '_')}_s{seed}"
    out = Path(args.out)
    run = out / name
    log = out / f"{name}.log"
    t0 = time.perf_counter()
    if not (run / "final" / "config.json").is_file():
        cmd = [sys.executable, "-m", "training.pretrain", "--config", args.config, "--cache", args.cache,
               "--out", str(out), "--name", name, "--max-steps", str(args.steps),
               "--set", f"train.seed={seed}", "--set", "train.device=cpu", *VARIANTS[variant]]
        cmd += [x for s in args.set for x in ("--set", s)]
        if args.no_mosmos:
            cmd.append("--no-mosmos")
        if (run / "latest.json").is_file():
            cmd.append("--resume")
        if _run(cmd, log) != 0:
            return {"variant": variant, "seed": seed, "error": f"training failed, see {log}"}
    eval_dir = out / f"{name}_eval"
    cmd = [sys.executable, "-m", "training.evaluate", "--checkpoint", str(run / "final"),
           "--data", args.eval_data or args.cache,
           "--split", args.split, "--out", str(eval_dir)]
    if _run(cmd, log) != 0:
        return {"variant": variant, "seed": seed, "error": f"evaluation failed, see {log}"}
    m = json.loads((eval_dir / "metrics.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tail = rows[-10:]
    local = sum(r["loss/local"] for r in tail) / len(tail)
    first = sum(r["loss/local"] for r in rows[:10]) / min(10, len(rows))
    return {"variant": variant, "seed": seed, "auc": m["ensemble"]["mean"]["auc"],
            "template_std": m["over_templates"]["auc"]["std"],
            "cosine": m["geometry"]["inter_anatomy_text_cosine_mean"],
            "local_first": first, "local_last": local, "steps": rows[-1]["step"],
            "minutes": (time.perf_counter() - t0) / 60.0}


def chance_local(batch: int, anatomies: int = 7) -> float:
    """Local loss at chance when every anatomy is in all ``batch`` samples (two directions summed)."""
    return anatomies * 2.0 * math.log(batch)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", required=True, help="prepared cache with a training and a held-out split")
    p.add_argument("--out", required=True, help="parent folder of the runs")
    p.add_argument("--config", default=str(REPO / "configs" / "phantom_cpu.yaml"))
    p.add_argument("--steps", type=int, default=200, help="optimiser steps per run (same for every cell)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--eval-data", default=None,
                   help="prepared cache to evaluate on (default: --cache); e.g. phantoms of an unused seed")
    p.add_argument("--split", default="valid", help="held-out split to evaluate")
    p.add_argument("--parallel", type=int, default=1, help="runs at once (each single-threaded)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--no-mosmos", action="store_true", help="CA-GCL terms only (all cells alike)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="pretrain override (all cells)")
    p.add_argument("--batch-size", type=int, default=16, help="only for the chance level printed")
    args = p.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    cells = [(v, s) for s in args.seeds for v in args.variants]
    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        results = list(pool.map(lambda c: run_cell(c[0], c[1], args), cells))
    (Path(args.out) / "ablation.json").write_text(json.dumps(results, indent=1))
    print(f"local loss at chance (7 anatomies, batch {args.batch_size}, directions summed): "
          f"{chance_local(args.batch_size):.2f}")
    print(f"{'variant':8s} {'seed':>4s} {'AUC':>6s} {'tmpl std':>8s} {'cosine':>7s} {'local first':>11s} "
          f"{'local last':>10s} {'steps':>5s} {'min':>5s}")
    for r in results:
        if "error" in r:
            print(f"{r['variant']:8s} {r['seed']:4d} {r['error']}")
            continue
        print(f"{r['variant']:8s} {r['seed']:4d} {r['auc']:6.3f} {r['template_std']:8.4f} {r['cosine']:7.3f} "
              f"{r['local_first']:11.2f} {r['local_last']:10.2f} {r['steps']:5d} {r['minutes']:5.1f}")
    for v in args.variants:
        ok = [r for r in results if r["variant"] == v and "error" not in r]
        if ok:
            mean = {k: sum(r[k] for r in ok) / len(ok) for k in ("auc", "template_std", "cosine", "local_last")}
            print(f"{v:8s} mean {mean['auc']:6.3f} {mean['template_std']:8.4f} {mean['cosine']:7.3f} "
                  f"{'':11s} {mean['local_last']:10.2f}")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
