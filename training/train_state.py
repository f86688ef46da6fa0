"""Exact, pickle-free training state: optimizer, scheduler, step, RNG states.

Written next to a model checkpoint (:func:`napari_ctvlp.engine.checkpoint.save_checkpoint`):

* ``training_state.safetensors``: every tensor (optimizer moments and step counters, the torch
  and CUDA RNG states, numpy's Mersenne-Twister key, loss generators);
* ``training_state.json``: everything else (optimizer param groups, scheduler state, step,
  epoch, python ``random`` state, numpy RNG position).

Per-rank RNG states go to ``rng_rank<r>.safetensors``/``.json`` so every rank resumes its own
streams. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        raise ValueError("tensor in a JSON part of the training state")
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"training state value of type {type(value).__name__} is not JSON-safe")


def flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``optimizer.state_dict()`` -> (tensors ``optim.<param id>.<name>``, JSON rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in state["state"].items():
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{name}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(pid), {})[name] = _json_safe(value)
    return tensors, {"param_groups": _json_safe(state["param_groups"]), "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer` (a dict for ``optimizer.load_state_dict``)."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if not key.startswith("optim."):
            continue
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for pid, values in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(values)
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g and isinstance(g["betas"], list):
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def rng_state(*, generators: dict[str, torch.Generator] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Current torch (+CUDA), numpy and python RNG states (+ named torch generators)."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    kind, key, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy_key"] = torch.from_numpy(np.asarray(key, dtype=np.int64))
    for name, gen in (generators or {}).items():
        tensors[f"rng.gen.{name}"] = gen.get_state()
    version, internal, gauss_next = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)],
            "python": [version, list(internal), gauss_next]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any], *,
                  generators: dict[str, torch.Generator] | None = None) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["rng.numpy_key"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))
    for name, gen in (generators or {}).items():
        key = f"rng.gen.{name}"
        if key in tensors:
            gen.set_state(tensors[key])


def save_training_state(
    directory: str | Path,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    progress: dict[str, Any],
    rank: int = 0,
    generators: dict[str, torch.Generator] | None = None,
) -> None:
    """Write the optimizer/scheduler/progress (rank 0) and this rank's RNG states into ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng_t, rng_m = rng_state(generators=generators)
    save_file(rng_t, str(directory / f"rng_rank{rank}.safetensors"))
    (directory / f"rng_rank{rank}.json").write_text(json.dumps(rng_m))
    if rank != 0:
        return
    opt_t, opt_m = flatten_optimizer(optimizer.state_dict())
    save_file(opt_t, str(directory / STATE_TENSORS))
    doc = {"optimizer": opt_m, "scheduler": _json_safe(scheduler.state_dict()), "progress": _json_safe(progress)}
    (directory / STATE_JSON).write_text(json.dumps(doc, indent=1))


def load_training_state(
    directory: str | Path,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rank: int = 0,
    generators: dict[str, torch.Generator] | None = None,
) -> dict[str, Any]:
    """Restore optimizer, scheduler and this rank's RNG states; returns the ``progress`` dict."""
    from safetensors.torch import load_file

    directory = Path(directory)
    for name in (STATE_TENSORS, STATE_JSON):
        if not (directory / name).is_file():
            raise ValueError(f"resume: {directory / name} is missing (not a complete training checkpoint)")
    doc = json.loads((directory / STATE_JSON).read_text())
    optimizer.load_state_dict(unflatten_optimizer(load_file(str(directory / STATE_TENSORS)), doc["optimizer"]))
    scheduler.load_state_dict(doc["scheduler"])
    rng_file = directory / f"rng_rank{rank}.safetensors"
    if rng_file.is_file():
        set_rng_state(load_file(str(rng_file)), json.loads((directory / f"rng_rank{rank}.json").read_text()),
                      generators=generators)
    return doc["progress"]
