"""AdamW parameter groups and the learning-rate schedule of :mod:`training.pretrain`.

Groups: no weight decay for biases, norms and other 1-D tensors; a pretrained text backbone at
``optim.text_lr`` (at the image rate InfoNCE near chance flattens the text space); with
``optim.head_lr``, the linear maps of fixed inputs into the joint space (:data:`HEAD_PREFIXES`) at
their own rate. Schedule: linear warm-up, then cosine decay to a floor.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

__all__ = ["HEAD_PREFIXES", "lr_lambda_factory", "param_groups"]


def lr_lambda_factory(warmup: int, total: int, min_ratio: float):
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""

    def fn(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


#: parameters that map fixed inputs straight into the joint space (the direct statistics heads and
#: the text head): with ``optim.head_lr`` they train at their own, usually higher, rate
HEAD_PREFIXES = ("statistics.anatomy_direct", "text.projection")


def param_groups(model: nn.Module, weight_decay: float, *, text_lr: float | None = None,
                 lr: float | None = None, head_lr: float | None = None) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay for biases, norms, embeddings-like 1-D tensors and scalars.

    With ``text_lr`` (and ``lr``), the layers of a *pretrained* text backbone (``text.backbone.*``
    of a model whose ``text.pretrained``) get their own two groups at ``text_lr``; the groups are
    named (``"name"``: ``decay``, ``no_decay``, ``text_decay``, ``text_no_decay``). With ``head_lr``,
    the parameters under :data:`HEAD_PREFIXES` form ``head_decay`` / ``head_no_decay`` at that rate
    (linear maps of fixed features into the joint space learn slowly at a ViT's rate).
    """
    pretrained_text = bool(getattr(getattr(model, "text", None), "pretrained", False)) and text_lr is not None
    groups: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": [], "text_decay": [], "text_no_decay": [],
                                             "head_decay": [], "head_no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind = "no_decay" if p.ndim < 2 or name.endswith(".bias") or "pos_embed" in name else "decay"
        if pretrained_text and name.startswith("text.backbone."):
            kind = "text_" + kind
        elif head_lr is not None and name.startswith(HEAD_PREFIXES):
            kind = "head_" + kind
        groups[kind].append(p)
    out = []
    for name, params in groups.items():
        if not params:
            continue
        group: dict[str, Any] = {"params": params, "weight_decay": 0.0 if "no_decay" in name else weight_decay,
                                 "name": name}
        if name.startswith("text_"):
            group["lr"] = float(text_lr)  # type: ignore[arg-type]
        elif name.startswith("head_"):
            group["lr"] = float(head_lr)  # type: ignore[arg-type]
        elif lr is not None:
            group["lr"] = float(lr)
        out.append(group)
    return out
