"""Built-in organ segmentation network: a UNETR-style decoder on the CTVLP 3D ViT + MOSMOS tag maps.

MOSMOS (Tian et al., "MOSMOS: Multi-organ segmentation facilitated by medical report
supervision") fine-tunes a report-supervised vision-language encoder for segmentation: the
pre-trained image encoder feeds a UNETR decoder (Hatamizadeh et al., "UNETR: Transformers for 3D
medical image segmentation", WACV 2022) and the pixel-tag attention maps of the tag decoder --
one tag per output class -- are concatenated to the decoder features and supervised with the
labels (loss ``L_seg + 0.8 L_pta``, each CE + Dice).

Design (our choice, see ``MODEL_CARD.md`` of the shipped weights):

* the encoder is *our* :class:`~.vit3d.ViT3D` (the CTVLP image encoder), so a pre-trained CTVLP
  checkpoint initialises it by copying ``vit.*`` and ``tag_decoder.*`` tensors verbatim
  (:func:`init_from_ctvlp`); MONAI's ``UNETR`` has its own ViT layout and is not used;
* the decoder is built from MONAI's UNETR blocks (``UnetrBasicBlock``, ``UnetrUpBlock``,
  ``UnetResBlock``, ``UnetOutBlock``) and generalised to anisotropic power-of-two patches
  (e.g. ``(8, 16, 16)``): one up-sampling stage per factor of two of the largest patch side;
  skip connections come from evenly spaced ViT blocks (UNETR: blocks 3, 6, 9 of 12);
* PTA (MOSMOS eq. 13): the tag decoder (:class:`~.tag_decoder.TagDecoder`) decodes ``K`` tag
  embeddings -- one per output class, the *frozen* text-encoder embeddings of the class phrases
  (a non-trainable buffer, set by :func:`init_from_ctvlp`; no text encoder is needed at inference)
  -- against the final ViT tokens. Its cross-attention maps ``[B, K, N]``, each scaled to a
  maximum of 1, divided by a learnable temperature ``eps`` (initial 0.07), are the PTA logits on
  the token grid; up-sampled trilinearly they are concatenated *once*, to the last decoder
  features before the output head, and supervised by the PTA loss.

Output classes (:data:`SEG_CLASSES`) group :data:`~napari_ctvlp.engine.anatomy.ORGAN_LABELS`
(lung lobes -> left / right lung) and map back to organ label values with
:func:`classes_to_organs`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetResBlock, UnetrUpBlock
from torch import Tensor, nn

from napari_ctvlp.engine.anatomy import LEFT_LUNG_LABELS, ORGAN_BY_NAME, RIGHT_LUNG_LABELS
from napari_ctvlp.engine.networks.tag_decoder import TagDecoder
from napari_ctvlp.engine.networks.vit3d import ViT3D

__all__ = [
    "SEG_CLASSES",
    "SegClass",
    "SegModelConfig",
    "SegOutput",
    "BuiltinSegNet",
    "organs_to_classes",
    "classes_to_organs",
    "init_from_ctvlp",
]


@dataclass(frozen=True)
class SegClass:
    """One output class: the organ label values it covers and the one it is written back as."""

    name: str
    phrase: str
    organ_values: tuple[int, ...]
    output_value: int


def _o(name: str) -> int:
    return ORGAN_BY_NAME[name].value


#: Output classes of the built-in model (index = class id); 0 is background (outside the body).
SEG_CLASSES: tuple[SegClass, ...] = (
    SegClass("background", "air outside the body", (0,), 0),
    SegClass("lung_left", "left lung", LEFT_LUNG_LABELS, _o("lung_left")),
    SegClass("lung_right", "right lung", RIGHT_LUNG_LABELS, _o("lung_right")),
    SegClass("trachea", "trachea", (_o("trachea"),), _o("trachea")),
    SegClass("esophagus", "esophagus", (_o("esophagus"),), _o("esophagus")),
    SegClass("heart", "heart", (_o("heart"),), _o("heart")),
    SegClass("aorta", "aorta", (_o("aorta"),), _o("aorta")),
    SegClass("mediastinum", "mediastinum", (_o("mediastinum"),), _o("mediastinum")),
    SegClass("spine", "spine", (_o("spine"),), _o("spine")),
    SegClass("bone", "bones", (_o("bone"),), _o("bone")),
    SegClass("body", "body", (_o("body"),), _o("body")),
)
SEG_CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in SEG_CLASSES)


def _organ_to_class_lut() -> np.ndarray:
    lut = np.zeros(256, dtype=np.uint8)
    for idx, cls in enumerate(SEG_CLASSES):
        for v in cls.organ_values:
            lut[v] = idx
    return lut


_ORGAN_TO_CLASS = _organ_to_class_lut()
_CLASS_TO_ORGAN = np.array([c.output_value for c in SEG_CLASSES], dtype=np.uint8)


def organs_to_classes(organs: np.ndarray) -> np.ndarray:
    """Organ label map (values of ``ORGAN_LABELS``) -> class ids of :data:`SEG_CLASSES` (uint8)."""
    organs = np.asarray(organs)
    if organs.size and (organs.min() < 0 or organs.max() > 255):
        raise ValueError(f"organs: label values must lie in 0..255, got {organs.min()}..{organs.max()}")
    return _ORGAN_TO_CLASS[organs.astype(np.uint8)]


def classes_to_organs(classes: np.ndarray) -> np.ndarray:
    """Class ids of :data:`SEG_CLASSES` -> organ label values (uint8)."""
    classes = np.asarray(classes)
    if classes.size and (classes.min() < 0 or classes.max() >= len(SEG_CLASSES)):
        raise ValueError(f"classes: ids must lie in 0..{len(SEG_CLASSES) - 1}, got {classes.min()}..{classes.max()}")
    return _CLASS_TO_ORGAN[classes.astype(np.intp)]


def _int3(name: str, value: Any) -> tuple[int, int, int]:
    try:
        out = tuple(int(v) for v in value)
    except TypeError as exc:
        raise ValueError(f"SegModelConfig.{name} must be 3 integers, got {value!r}") from exc
    if len(out) != 3 or min(out) < 1:
        raise ValueError(f"SegModelConfig.{name} must be 3 positive integers, got {value!r}")
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class SegModelConfig:
    """Architecture of :class:`BuiltinSegNet`.

    Attributes:
        roi_size: network input (sliding-window patch) ``(D, H, W)``; the ViT position embedding
            is tied to it.
        patch_size: ViT patch; powers of two >= 2 that divide ``roi_size``.
        hidden_size, depth, num_heads, mlp_dim: ViT (same meaning as in ``CTVLPConfig``).
        feature_size: decoder width at full resolution (doubles per stage).
        output_stride: 1 = the decoder runs to full resolution (UNETR); 2 = it stops at half
            resolution and the logits are up-sampled trilinearly (8x fewer full-size
            convolutions: the CPU-friendly choice of the shipped model).
        num_classes: output classes (``len(SEG_CLASSES)``).
        use_pta: MOSMOS pixel-tag attention maps (tag decoder) on; off = plain UNETR-style model.
        tag_embed_dim: width of the learnt tag embeddings (``CTVLPConfig.embed_dim`` when
            initialised from a CTVLP).
        tag_decoder_layers, tag_context_length: tag decoder (as in ``CTVLPConfig``).
    """

    roi_size: tuple[int, int, int] = (48, 64, 64)
    patch_size: tuple[int, int, int] = (8, 8, 8)
    hidden_size: int = 96
    depth: int = 4
    num_heads: int = 4
    mlp_dim: int = 192
    feature_size: int = 8
    output_stride: int = 1
    num_classes: int = len(SEG_CLASSES)
    use_pta: bool = True
    tag_embed_dim: int = 64
    tag_decoder_layers: int = 1
    tag_context_length: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "roi_size", _int3("roi_size", self.roi_size))
        object.__setattr__(self, "patch_size", _int3("patch_size", self.patch_size))
        for p in self.patch_size:
            if p < 2 or p & (p - 1):
                raise ValueError(f"SegModelConfig.patch_size entries must be powers of two >= 2, got {self.patch_size}")
        if any(s % p for s, p in zip(self.roi_size, self.patch_size)):
            raise ValueError(f"SegModelConfig.roi_size {self.roi_size} is not divisible by patch_size {self.patch_size}")
        for name in ("hidden_size", "depth", "num_heads", "mlp_dim", "feature_size", "num_classes",
                     "tag_embed_dim", "tag_decoder_layers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"SegModelConfig.{name} must be a positive integer, got {v!r}")
        if self.output_stride not in (1, 2):
            raise ValueError(f"SegModelConfig.output_stride must be 1 or 2, got {self.output_stride!r}")
        if self.output_stride == 2 and self.num_stages < 2:
            raise ValueError("SegModelConfig.output_stride 2 needs a patch side of at least 4")
        if self.num_classes < 2:
            raise ValueError(f"SegModelConfig.num_classes must be >= 2, got {self.num_classes}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"SegModelConfig.hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if not isinstance(self.tag_context_length, int) or self.tag_context_length < 0:
            raise ValueError(f"SegModelConfig.tag_context_length must be >= 0, got {self.tag_context_length!r}")

    @property
    def token_grid(self) -> tuple[int, int, int]:
        """ViT token grid ``roi_size // patch_size``."""
        return tuple(s // p for s, p in zip(self.roi_size, self.patch_size))  # type: ignore[return-value]

    @property
    def num_stages(self) -> int:
        """Up-sampling stages from the token grid to full resolution (log2 of the largest patch side)."""
        return int(round(math.log2(max(self.patch_size))))

    def stage_kernel(self, stage: int) -> tuple[int, int, int]:
        """Up-sampling factor per axis of ``stage`` (1 = finest, from level 1 to full resolution)."""
        return tuple(2 if stage <= int(round(math.log2(p))) else 1 for p in self.patch_size)  # type: ignore[return-value]

    def skip_blocks(self) -> tuple[int, ...]:
        """1-based ViT block indices whose outputs feed the skip connections of levels 1..S-1."""
        s = self.num_stages
        return tuple(min(self.depth, max(1, round(self.depth * k / s))) for k in range(1, s))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SegModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        if not isinstance(d, dict):
            raise ValueError(f"SegModelConfig.from_dict needs a dict, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown SegModelConfig key(s): {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def from_ctvlp(cls, ctvlp_config: Any, **overrides: Any) -> SegModelConfig:
        """Encoder (and tag decoder) geometry of a ``CTVLPConfig``, so its weights can be copied."""
        c = ctvlp_config
        base = dict(
            roi_size=c.image_size, patch_size=c.patch_size, hidden_size=c.hidden_size, depth=c.depth,
            num_heads=c.num_heads, mlp_dim=c.mlp_dim, tag_embed_dim=c.embed_dim,
            tag_decoder_layers=c.tag_decoder_layers,
            # a CTVLP whose context lives in the text encoder has none in its decoder
            tag_context_length=c.tag_context_length if c.tag_context == "decoder" else 0,
        )
        return cls(**{**base, **overrides})

    def replace(self, **changes: Any) -> SegModelConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class SegOutput:
    """Output of :meth:`BuiltinSegNet.forward_train`.

    Attributes:
        logits: ``[B, K, D, H, W]`` segmentation logits.
        pta_logits: ``[B, K, D, H, W]`` up-sampled pixel-tag logits ``(map / max map) / eps``, or
            None when the model has no PTA branch.
        tag_maps: ``[B, K, N]`` raw pixel-tag attention (softmax over tokens), or None.
    """

    logits: Tensor
    pta_logits: Tensor | None
    tag_maps: Tensor | None


_NORM = ("instance", {"affine": True})


class _SkipUp(nn.Module):
    """ViT hidden state on the token grid -> features at level ``k`` (transposed convs + res blocks)."""

    def __init__(self, in_ch: int, out_ch: int, kernels: list[tuple[int, int, int]]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ch = in_ch
        for i, k in enumerate(kernels):
            layers.append(nn.ConvTranspose3d(ch, out_ch, kernel_size=k, stride=k, bias=False))
            if i > 0 or len(kernels) == 1:
                layers.append(UnetResBlock(3, out_ch, out_ch, kernel_size=3, stride=1, norm_name=_NORM))
            ch = out_ch
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class BuiltinSegNet(nn.Module):
    """UNETR-style segmentation network on the CTVLP ViT with MOSMOS pixel-tag maps.

    Args:
        config: the architecture (:class:`SegModelConfig`).

    Forward: image ``[B, 1, *roi_size]`` in ``[-1, 1]`` -> logits ``[B, K, *roi_size]``
    (:meth:`forward_train` also returns the PTA logits).
    """

    def __init__(self, config: SegModelConfig) -> None:
        super().__init__()
        if not isinstance(config, SegModelConfig):
            raise ValueError(f"config must be a SegModelConfig, got {type(config).__name__}")
        self.config = config
        c, f, s = config, config.feature_size, config.num_stages
        self.vit = ViT3D(c.roi_size, c.patch_size, in_channels=1, hidden_size=c.hidden_size, depth=c.depth,
                         num_heads=c.num_heads, mlp_dim=c.mlp_dim)
        k_pta = c.num_classes if c.use_pta else 0
        if c.use_pta:
            self.tag_decoder = TagDecoder(c.hidden_size, c.tag_embed_dim, num_layers=c.tag_decoder_layers,
                                          num_heads=c.num_heads, mlp_dim=c.mlp_dim,
                                          context_length=c.tag_context_length)
            # frozen tag queries (MOSMOS: text-encoder embeddings of the class tags); a random fixed
            # direction per class until init_from_ctvlp copies the text encoder's embeddings in
            emb = torch.randn(c.num_classes, c.tag_embed_dim, generator=torch.Generator().manual_seed(0))
            self.register_buffer("tag_embeddings", F.normalize(emb, dim=-1))
            self.log_eps = nn.Parameter(torch.tensor(math.log(0.07)))
        low = 1 if c.output_stride == 2 else 0  # resolution level of the output
        kernels = [c.stage_kernel(st) for st in range(1, s + 1)]  # kernels[st-1]: level st -> st-1
        # image skip at level `low` (strided for output_stride 2), ViT skips at levels low+1..S-1
        self.enc0 = UnetrBasicBlock(3, 1, f * 2**low, kernel_size=3, stride=kernels[0] if low else 1,
                                    norm_name=_NORM, res_block=True)
        self.skips = nn.ModuleList(
            _SkipUp(c.hidden_size, f * 2**k, [kernels[st - 1] for st in range(s, k, -1)]) for k in range(low + 1, s)
        )
        ups = []
        for st in range(s, low, -1):  # decoder stage st: level st -> st-1
            in_ch = c.hidden_size if st == s else f * 2**st
            ups.append(UnetrUpBlock(3, in_ch, f * 2 ** (st - 1), kernel_size=3,
                                    upsample_kernel_size=kernels[st - 1], norm_name=_NORM, res_block=True))
        self.ups = nn.ModuleList(ups)
        self.out = UnetOutBlock(3, f * 2**low + k_pta, c.num_classes)
        self._low = low
        self._low_size = tuple(r // (2 ** min(low, int(round(math.log2(p))))) for r, p in zip(c.roi_size, c.patch_size))
        self._skip_blocks = c.skip_blocks()

    def _encode(self, image: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        expected = (1, *self.config.roi_size)
        if image.ndim != 5 or tuple(image.shape[1:]) != expected:
            raise ValueError(f"image has shape {tuple(image.shape)}, expected [B, {', '.join(map(str, expected))}]")
        vit = self.vit
        x = vit.patch_embed(image).flatten(2).transpose(1, 2)
        x = vit.pos_drop(x + vit.pos_embed)
        hidden: dict[int, torch.Tensor] = {}
        for i, block in enumerate(vit.blocks, start=1):
            x = block(x)
            if i in self._skip_blocks:
                hidden[i] = x
        return vit.norm(x), [hidden[i] for i in self._skip_blocks][self._low:]

    def _grid(self, tokens: torch.Tensor) -> torch.Tensor:
        b, _n, ch = tokens.shape
        return tokens.transpose(1, 2).reshape(b, ch, *self.config.token_grid)

    def forward_train(self, image: torch.Tensor) -> SegOutput:
        """Image ``[B, 1, *roi_size]`` -> :class:`SegOutput` (logits, PTA logits, tag maps)."""
        tokens, hidden = self._encode(image)
        bottleneck = self._grid(tokens)
        maps = pta_grid = pta_full = None
        if self.config.use_pta:
            maps = self.tag_decoder(tokens, self.tag_embeddings).maps  # [B, K, N]
            scaled = maps / maps.amax(dim=-1, keepdim=True).clamp_min(1e-12)
            pta_grid = (scaled / self.log_eps.exp()).reshape(maps.shape[0], maps.shape[1], *self.config.token_grid)
        skips = [self.enc0(image)] + [up(self._grid(h)) for up, h in zip(self.skips, hidden)]
        x = bottleneck
        for up, skip in zip(self.ups, reversed(skips)):
            x = up(x, skip)
        if pta_grid is not None:
            pta_low = F.interpolate(pta_grid, size=self._low_size, mode="trilinear", align_corners=False)
            x = torch.cat([x, pta_low], dim=1)
            pta_full = pta_low if self._low == 0 else F.interpolate(
                pta_grid, size=self.config.roi_size, mode="trilinear", align_corners=False)
        logits = self.out(x)
        if self._low:
            logits = F.interpolate(logits, size=self.config.roi_size, mode="trilinear", align_corners=False)
        return SegOutput(logits=logits, pta_logits=pta_full, tag_maps=maps)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Image ``[B, 1, *roi_size]`` -> segmentation logits ``[B, K, *roi_size]``."""
        return self.forward_train(image).logits



def init_from_ctvlp(model: Any, ctvlp: Any) -> dict[str, Any]:
    """Copy a pre-trained CTVLP's ViT (and tag decoder) into ``model`` where names and shapes match.

    The tag embeddings are set to the CTVLP text encoder's embeddings of the class phrases
    (:attr:`SegClass.phrase`) when the widths agree.

    Returns:
        ``{"copied": n, "skipped": [names], "tag_embeddings": bool}``.
    """
    own = model.state_dict()
    theirs = ctvlp.state_dict()
    copy: dict[str, Any] = {}
    skipped: list[str] = []
    for name, value in theirs.items():
        if not name.startswith(("vit.", "tag_decoder.")):
            continue
        if name in own and own[name].shape == value.shape:
            copy[name] = value.detach().to(own[name].dtype)
        else:
            skipped.append(name)
    model.load_state_dict(copy, strict=False)
    tag_ok = False
    if model.config.use_pta:
        with torch.no_grad():
            emb = ctvlp.encode_tags([c.phrase for c in SEG_CLASSES])
            if tuple(emb.shape) == tuple(model.tag_embeddings.shape):
                model.tag_embeddings.copy_(emb.to(model.tag_embeddings.dtype))
                tag_ok = True
    return {"copied": len(copy), "skipped": skipped, "tag_embeddings": tag_ok}
