"""A real multi-process ``torchrun`` pre-training run (2 ranks, gloo on CPU), past step 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from phantom_cache import tiny_argv, tiny_cache


@pytest.mark.slow
def test_torchrun_two_processes_trains_and_checkpoints(tmp_path: Path) -> None:
    cache = tiny_cache(tmp_path, n=12, seed=5)  # 12 samples / 2 ranks / batch 3 = 2 steps per epoch
    out = tmp_path / "runs"
    argv = tiny_argv(cache, out, "ddp", "--set", "optim.epochs=2", "--set", "train.checkpoint_every=3")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "training.pretrain", *argv]
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = out / "ddp"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss/total"]) for r in rows)
    assert json.loads((run / "params.json").read_text())  # rank 0 wrote the run folder
    ckpt = run / json.loads((run / "latest.json").read_text())["checkpoint"]
    assert {"rng_rank0.json", "rng_rank1.json"} <= {p.name for p in ckpt.iterdir()}  # every rank's RNG
    from napari_ctvlp.engine.checkpoint import load_checkpoint

    loaded = load_checkpoint(run / "final")
    assert loaded.meta["training"]["world_size"] == 2 and loaded.meta["training"]["step"] == 4
