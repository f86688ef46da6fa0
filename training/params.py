"""Training parameters: a YAML file, command-line ``--set key=value`` overrides, frozen result.

A parameter file has the sections of :data:`DEFAULTS` (``model``, ``preprocess``, ``data``,
``optim``, ``loss``, ``train``); every key it names must exist there (typos fail early with the
list of known keys). ``model`` takes a ``preset`` (``tiny``, ``phantom_cpu``, ``vit_b``) plus any
:class:`~napari_ctvlp.engine.networks.CTVLPConfig` field. Overrides use dotted keys and YAML
values, e.g. ``--set optim.lr=3e-4 --set model.depth=2 --set loss.use_global=false``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from napari_ctvlp.engine.networks.config import CTVLPConfig

#: Every known key with its default. ``None`` means "no default" (any value accepted).
DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {"preset": "phantom_cpu"},
    "preprocess": {
        "spacing_mm": None,  # None: keep the preprocess module's default for the grid
        "hu_window": [-1000.0, 1000.0],
    },
    "data": {
        "cache": None,  # folder written by `python -m training.prepare`
        "split": "train",
        "num_workers": 0,
        "augment_text": True,
        "text_aug_keep_findings": False,  # True: the sentence subset never drops a stated finding
        "augment_image": False,  # shift image + masks together, small intensity gain/offset
        "report_max_length": 512,  # token limit of whole reports (MOSMOS image-report loss)
    },
    "optim": {
        "lr": 1e-4,
        "weight_decay": 0.05,
        "betas": [0.9, 0.98],
        "warmup_steps": 100,
        "min_lr_ratio": 0.0,
        "epochs": 20,
        "max_steps": None,  # stop after this many optimiser steps (budget); None = epochs
        "batch_size": 14,  # per process (GPU); the global batch is batch_size * world_size
        "grad_clip": 1.0,
        # pretrained text-encoder layers train at their own, lower rate with their own warm-up:
        # at the image rate, InfoNCE near chance flattens (collapses) the text space
        "text_lr": 1e-5,
        "text_warmup_steps": None,  # None: the same as warmup_steps
        # direct statistics heads and the text head (training.optim.HEAD_PREFIXES); None = optim.lr
        "head_lr": None,
    },
    "loss": {
        "use_global": True,
        "global_weight": 0.1,
        "num_groups": None,  # K synthetic groups of the global loss; None = batch size
        "mosmos": True,
        "irc_weight": 1.0,
        "mlr_weight": 1.0,
        "sentence_weight": 0.0,  # sentence-to-anatomy contrast (training.sentence_loss); 0 = off
    },
    "train": {
        "seed": 0,
        "bf16": True,  # autocast on CUDA only
        "gradient_checkpointing": False,
        "checkpoint_every": 500,
        "log_every": 10,
        "deterministic": False,
        "device": None,  # None: cuda when available else cpu
    },
}


@dataclass(frozen=True)
class TrainParams:
    """Resolved training parameters (sections as plain dicts, plus the model config)."""

    model: CTVLPConfig
    preprocess: dict[str, Any]
    data: dict[str, Any]
    optim: dict[str, Any]
    loss: dict[str, Any]
    train: dict[str, Any]
    raw: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of the resolved parameters (what a run records)."""
        out = copy.deepcopy(self.raw)
        out["model_config"] = self.model.to_dict()
        return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=3e-4"`` -> ``(["optim", "lr"], 0.0003)`` (the value is parsed as YAML)."""
    import yaml

    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value")
    key, value = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if len(parts) < 2:
        raise ValueError(f"override key {key!r} must be dotted (section.key), e.g. optim.lr=1e-4")
    parsed = yaml.safe_load(value) if value.strip() else None
    # YAML 1.1 reads "3e-4" as a string; accept it as a float.
    if isinstance(parsed, str):
        try:
            parsed = float(parsed)
        except ValueError:
            pass
    return parts, parsed


def _merge(base: dict[str, Any], new: Mapping[str, Any], *, where: str, strict_keys: bool) -> None:
    for key, value in new.items():
        if strict_keys and key not in base:
            known = ", ".join(sorted(base))
            raise ValueError(f"unknown parameter {where}{key!r}; known in this section: {known}")
        base[key] = copy.deepcopy(value)


def resolve_model_config(model: Mapping[str, Any]) -> CTVLPConfig:
    """Build the :class:`CTVLPConfig` of a ``model`` section (``preset`` + field overrides)."""
    fields = dict(model)
    preset = fields.pop("preset", "phantom_cpu")
    makers = {"tiny": CTVLPConfig.tiny, "phantom_cpu": CTVLPConfig.phantom_cpu, "vit_b": CTVLPConfig.vit_b}
    if preset not in makers:
        raise ValueError(f"model.preset {preset!r} is unknown; choose one of {', '.join(makers)}")
    base = makers[preset]().to_dict()
    unknown = sorted(set(fields) - set(base))
    if unknown:
        raise ValueError(f"unknown model parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(base))}")
    return CTVLPConfig.from_dict({**base, **fields})


def load_params(
    path: str | Path | None = None,
    *,
    overrides: Iterable[str] = (),
    updates: Mapping[str, Mapping[str, Any]] | None = None,
) -> TrainParams:
    """Read a YAML parameter file, apply overrides and validate.

    Args:
        path: YAML file (``None``: the defaults only).
        overrides: ``section.key=value`` strings (``--set``), applied after the file.
        updates: nested dict applied last (the CLI switches such as ``--no-global``).

    Raises:
        ValueError: the file is missing or not a mapping, or a key is unknown.
    """
    import yaml

    raw = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"parameter file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"parameter file {path} must hold a mapping of sections, got {type(loaded).__name__}")
        for section, values in loaded.items():
            if section not in raw:
                raise ValueError(f"{path}: unknown section {section!r}; known: {', '.join(raw)}")
            if not isinstance(values, dict):
                raise ValueError(f"{path}: section {section!r} must be a mapping")
            _merge(raw[section], values, where=f"{path}: {section}.", strict_keys=section != "model")
    for text in overrides:
        parts, value = parse_override(text)
        section = parts[0]
        if section not in raw:
            raise ValueError(f"override {text!r}: unknown section {section!r}; known: {', '.join(raw)}")
        if len(parts) != 2:
            raise ValueError(f"override {text!r}: use exactly section.key=value")
        _merge(raw[section], {parts[1]: value}, where=f"override {section}.", strict_keys=section != "model")
    for section, values in (updates or {}).items():
        if section not in raw:
            raise ValueError(f"unknown section {section!r}")
        _merge(raw[section], values, where=f"{section}.", strict_keys=section != "model")

    model = resolve_model_config(raw["model"])
    optim = raw["optim"]
    for key in ("lr", "batch_size", "epochs"):
        if optim[key] is None or float(optim[key]) <= 0:
            raise ValueError(f"optim.{key} must be > 0, got {optim[key]!r}")
    if optim["max_steps"] is not None and int(optim["max_steps"]) < 1:
        raise ValueError(f"optim.max_steps must be >= 1 or null, got {optim['max_steps']!r}")
    json.dumps(raw)  # everything must be JSON-safe (recorded in the run folder and checkpoints)
    return TrainParams(model=model, preprocess=raw["preprocess"], data=raw["data"], optim=optim,
                       loss=raw["loss"], train=raw["train"], raw=raw)
