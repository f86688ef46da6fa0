"""CTVLP: the fine-grained 3D CT vision-language model (CA-GCL pooling + MOSMOS tag decoder).

Components:

* :class:`~.vit3d.ViT3D` image encoder -> tokens ``[B, N, C]`` (computed once per volume);
* :class:`~.anatomy_pooling.AnatomyPooling` -> one embedding per anatomy (CA-GCL, Zhang et al.);
* :class:`~.text_encoder.TextEncoder` -> sentence embeddings in the same joint space;
* :class:`~.tag_decoder.TagDecoder` -> pixel-tag attention maps and multi-label tag logits
  (MOSMOS, Tian et al.);
* optional heads over the fixed voxel bins (``statistics_edges``): :class:`~.evidence.TagEvidence`
  (``tag_evidence``: finding evidence maps) and :class:`~.prompt_evidence.PromptEvidence`
  (``prompt_evidence``: any sentence's score and map from the cells of an anatomy);
* ``logit_scale``: learnable inverse temperature of the contrastive similarities.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from napari_ctvlp.engine.networks.anatomy_pooling import AnatomyEmbeddings, AnatomyPooling
from napari_ctvlp.engine.networks.config import CTVLPConfig
from napari_ctvlp.engine.networks.conv_stem import DenseFusion
from napari_ctvlp.engine.networks.evidence import TagEvidence
from napari_ctvlp.engine.networks.prompt_evidence import PromptEvidence
from napari_ctvlp.engine.networks.tag_decoder import TagDecoder, TagOutput
from napari_ctvlp.engine.networks.text_encoder import TextEncoder
from napari_ctvlp.engine.networks.vit3d import ViT3D
from napari_ctvlp.engine.networks.voxel_statistics import VoxelStatistics

__all__ = ["CTVLP", "AnatomyEmbeddings", "ImageEmbedding", "TagOutput", "MAX_LOGIT_SCALE"]

logger = logging.getLogger(__name__)

#: ``logit_scale.exp()`` is clamped at this value (CLIP), i.e. temperature >= 0.01.
MAX_LOGIT_SCALE = 100.0


@dataclass(frozen=True)
class ImageEmbedding:
    """Output of :meth:`CTVLP.embed_image`.

    Attributes:
        tokens: ``[B, N, C]`` spatial features on ``config.token_grid``.
        anatomies: the per-anatomy embeddings.
        cells: ``[B, N, F]`` raw voxel statistics of every feature cell, or None for models without
            ``config.statistics_edges`` (pass to :meth:`CTVLP.token_embeddings`).
        stage4: ``[B, S, D/4, H/4, W/4]`` the stride-4 stem features the statistics read (None
            without statistics).
    """

    tokens: Tensor
    anatomies: AnatomyEmbeddings
    cells: Tensor | None = None
    stage4: Tensor | None = None


class CTVLP(nn.Module):
    """Fine-grained CT vision-language model.

    Args:
        config: the architecture (see :class:`CTVLPConfig`; presets ``tiny``, ``phantom_cpu``,
            ``vit_b``).
        allow_download: let the text encoder download from the Hugging Face hub if it is not
            available locally (default: never download).

    Attributes:
        config: the architecture.
        tokenizer: the Hugging Face tokenizer of the text encoder.
        logit_scale: ``log(1 / temperature)``; use ``logit_scale.exp().clamp(max=100)``.
    """

    def __init__(self, config: CTVLPConfig, *, allow_download: bool = False) -> None:
        super().__init__()
        if not isinstance(config, CTVLPConfig):
            raise ValueError(f"config must be a CTVLPConfig, got {type(config).__name__}")
        self.config = config
        self.vit = ViT3D(
            config.image_size, config.patch_size, in_channels=config.in_channels,
            hidden_size=config.hidden_size, depth=config.depth, num_heads=config.num_heads,
            mlp_dim=config.mlp_dim, dropout=config.dropout,
            gradient_checkpointing=config.gradient_checkpointing, stem=config.stem,
            stem_windows=config.stem_windows,
        )
        if config.feature_stride:
            stage = {4: 1, 8: 2}[config.feature_stride]
            self.dense: DenseFusion | None = DenseFusion(
                config.hidden_size, self.vit.patch_embed.widths[stage], config.vit_grid, config.token_grid
            )
            self._dense_stage = stage
        else:
            self.dense = None
        if config.statistics_edges:
            self.statistics: VoxelStatistics | None = VoxelStatistics(
                edges=config.statistics_edges, feature_channels=self.vit.patch_embed.widths[1],
                hidden_size=config.hidden_size, embed_dim=config.embed_dim, image_size=config.image_size,
                cell=config.feature_patch, texture=config.texture_statistics,
                num_anatomies=len(config.anatomies) if config.statistics_heads == "anatomy" else 0,
            )
        else:
            self.statistics = None
        self.text = TextEncoder(
            config.text_encoder, embed_dim=config.embed_dim, random_init=config.text_random_init,
            trainable_layers=config.text_trainable_layers, max_length=config.text_max_length,
            allow_download=allow_download, pooling=config.text_pooling, head=config.text_head,
        )
        self.anatomy_pooling = AnatomyPooling(
            len(config.anatomies), config.hidden_size, config.embed_dim, num_heads=config.num_heads
        )
        self.tag_decoder = TagDecoder(
            config.hidden_size, config.embed_dim, num_layers=config.tag_decoder_layers,
            num_heads=config.num_heads, mlp_dim=config.mlp_dim,
            context_length=config.tag_context_length if config.tag_context == "decoder" else 0,
            dropout=config.dropout,
        )
        if config.tag_context == "text" and config.tag_context_length:
            # MOSMOS eq. 6 (CoOp): context vectors prepended to each tag's token embeddings
            self.tag_text_context = nn.Parameter(torch.randn(config.tag_context_length, self.text.width) * 0.02)
        else:
            self.tag_text_context = None
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))
        self.evidence: TagEvidence | None = None
        if config.tag_evidence:
            from napari_ctvlp.engine.anatomy import ABNORMALITIES

            assert self.statistics is not None  # the config checks it
            self.evidence = TagEvidence(
                num_bins=self.statistics.bins + self.statistics.texture_bins,
                tag_anatomy=[config.anatomies.index(a.anatomy) for a in ABNORMALITIES],
                image_size=config.image_size, smooth=config.evidence_smooth,
                compartments=[config.anatomies.index(a) for a in config.evidence_compartments],
                compartment_bins=self.statistics.bins,
            )
        self.prompt_evidence: PromptEvidence | None = None
        if config.prompt_evidence:
            assert self.statistics is not None  # the config checks it
            self.prompt_evidence = PromptEvidence(
                num_bins=self.statistics.bins + self.statistics.texture_bins, text_dim=self.text.width,
                groups=range(len(config.anatomies)), image_size=config.image_size,
                compartments=[config.anatomies.index(a) for a in config.evidence_compartments],
                compartment_bins=self.statistics.bins,
            )
        self._tag_cache: Tensor | None = None

    # ------------------------------------------------------------------ properties
    @property
    def tokenizer(self) -> Any:
        """The Hugging Face tokenizer of the text encoder."""
        return self.text.tokenizer

    @property
    def device(self) -> torch.device:
        """Device of the model parameters."""
        return self.logit_scale.device

    def temperature(self) -> float:
        """Current contrastive temperature ``1 / clamp(exp(logit_scale), max=100)``."""
        return float(1.0 / self.logit_scale.detach().exp().clamp(max=MAX_LOGIT_SCALE))

    def frozen_state_names(self) -> list[str]:
        """``state_dict`` keys of frozen pretrained text-backbone tensors (not stored in checkpoints)."""
        return [f"text.{k}" for k in self.text.frozen_backbone_names()]

    # ------------------------------------------------------------------ image side
    def _image_side(self, image: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None, Any]:
        """ViT (+ dense fusion, + per-cell statistics) -> ``(spatial features, stride-4 stem stage,
        raw cell statistics, voxel bins)`` (the last three None without ``config.statistics_edges``)."""
        tokens, stages = self.vit.forward_features(image)
        stage4 = cells = extra = bins = None
        if self.statistics is not None:
            stage4 = stages[1]
            bins = self.statistics.voxel_bins(image)
            cells = self.statistics.cell_inputs(image, stage4, bins=bins)
            extra = self.statistics.cell_proj(cells)
        if self.dense is None:
            return (tokens if extra is None else tokens + extra), stage4, cells, bins
        return self.dense(tokens, stages[self._dense_stage], extra=extra), stage4, cells, bins

    def encode_image(self, image: Tensor) -> Tensor:
        """Image ``[B, 1, D, H, W]`` (model grid, values in [-1, 1]) -> spatial features ``[B, N, C]``
        on ``config.token_grid``: the ViT tokens, or the dense fused features when
        ``config.feature_stride`` is set (with per-cell intensity statistics when
        ``config.statistics_edges`` is set)."""
        return self._image_side(image)[0]

    def embed_image(
        self, image: Tensor, anatomy_masks: Tensor, *, token_masks: Tensor | None = None,
        return_attention: bool = False,
    ) -> ImageEmbedding:
        """The whole image side in one pass: spatial features, anatomy embeddings, cell statistics.

        Args:
            image: ``[B, 1, D, H, W]`` on the model grid.
            anatomy_masks: ``[B, A, D, H, W]`` bool on the model grid.
            token_masks: precomputed :meth:`masks_to_tokens` of ``anatomy_masks`` (e.g. by the data
                loader); computed here when None.
            return_attention: also return the pooling attention.
        """
        tokens, stage4, cells, bins = self._image_side(image)
        if token_masks is None:
            token_masks = self.masks_to_tokens(anatomy_masks)
        stats = direct = None
        if self.statistics is not None:
            self._check_masks(anatomy_masks)
            stats, direct = self.statistics.anatomy_features(image, stage4, anatomy_masks, bins=bins)
        pooled = self.anatomy_pooling(tokens, token_masks, statistics=stats, direct=direct,
                                      return_attention=return_attention)
        return ImageEmbedding(tokens=tokens, anatomies=pooled, cells=cells, stage4=stage4)

    def _check_masks(self, masks: Tensor) -> None:
        a = len(self.config.anatomies)
        expected = (a, *self.config.image_size)
        if masks.ndim != 5 or tuple(masks.shape[1:]) != expected:
            raise ValueError(
                f"anatomy masks have shape {tuple(masks.shape)}, expected [B, {', '.join(map(str, expected))}]"
            )

    def masks_to_tokens(self, masks: Tensor) -> Tensor:
        """Anatomy masks ``[B, A, D, H, W]`` (bool) -> token masks ``[B, A, N]``.

        ``config.token_weighting == "fraction"``: float32, the share of each patch inside the
        anatomy (average pooling); ``"any"``: bool, any voxel of the patch inside (max pooling).
        """
        self._check_masks(masks)
        a = len(self.config.anatomies)
        b = masks.shape[0]
        (gd, gh, gw), (pd, ph, pw) = self.config.token_grid, self.config.feature_patch
        blocks = (masks != 0).reshape(b, a, gd, pd, gh, ph, gw, pw)
        if self.config.token_weighting == "fraction":
            return blocks.float().mean(dim=(3, 5, 7)).reshape(b, a, gd * gh * gw)
        return blocks.any(dim=7).any(dim=5).any(dim=3).reshape(b, a, gd * gh * gw)

    def pool_anatomies(
        self, tokens: Tensor, token_masks: Tensor, *, return_attention: bool = False
    ) -> AnatomyEmbeddings:
        """Per-anatomy embeddings ``[B, A, E]`` from tokens and token masks (see :class:`AnatomyPooling`).

        Models with ``config.statistics_edges`` also need the image and voxel masks: use :meth:`embed_image`."""
        if self.statistics is not None:
            raise ValueError("this model pools voxel statistics with the tokens: call embed_image(image, anatomy_masks)")
        return self.anatomy_pooling(tokens, token_masks, return_attention=return_attention)

    def token_embeddings(self, tokens: Tensor, *, cells: Tensor | None = None,
                         token_masks: Tensor | None = None) -> Tensor:
        """Per-token joint-space embeddings ``[B, N, E]`` (L2-normalised) for prompt heatmaps.

        With ``cells`` (:attr:`ImageEmbedding.cells` of a model with voxel statistics) each token
        is embedded as a one-cell anatomy, its statistics read by the anatomies' heads; without,
        through the pooling value path only (what the MOSMOS image-report term averages in training).
        With per-anatomy statistics heads (``config.statistics_heads="anatomy"``) a token is read
        by the head of the anatomy it lies in (:meth:`token_anatomy` of ``token_masks``; the last
        anatomy, the body, where none is given).
        """
        if cells is None or self.statistics is None:
            return self.anatomy_pooling.project_tokens(tokens)
        anatomy = None
        if self.statistics.per_anatomy:
            if token_masks is None:
                anatomy = len(self.config.anatomies) - 1
            else:
                anatomy = self.token_anatomy(token_masks)
        hidden, direct = self.statistics.cell_anatomy_features(cells, anatomy=anatomy)
        return self.anatomy_pooling.project_tokens(tokens, statistics=hidden, direct=direct)

    @staticmethod
    def token_anatomy(token_masks: Tensor) -> Tensor:
        """The anatomy each token lies in, ``[B, N]`` (long) from token masks ``[B, A, N]``: the
        smallest anatomy (fewest tokens) that holds at least half of the token, else the anatomy
        holding most of it, else (no anatomy touches it) the last anatomy (the body); a lung token
        is read as lung, not as body, a heart token as heart, not as mediastinum."""
        w = token_masks.float()
        size = w.sum(-1, keepdim=True)  # [B, A, 1]
        inside = w >= 0.5
        best_small = torch.where(inside, -size, torch.full_like(w, float("-inf"))).argmax(1)
        touched = torch.where(w.amax(1) > 0, w.argmax(1), torch.full_like(best_small, w.shape[1] - 1))
        return torch.where(inside.any(1), best_small, touched)

    def forward(self, image: Tensor, anatomy_masks: Tensor, *, return_attention: bool = False) -> AnatomyEmbeddings:
        """Image ``[B, 1, D, H, W]`` + anatomy masks ``[B, A, D, H, W]`` -> :class:`AnatomyEmbeddings`."""
        return self.embed_image(image, anatomy_masks, return_attention=return_attention).anatomies

    # ------------------------------------------------------------------ text side
    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """Sentences -> L2-normalised embeddings ``[T, E]``."""
        return self.text.encode(texts)

    def encode_text_tokens(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Pre-tokenized ``input_ids``/``attention_mask`` ``[T, L]`` -> embeddings ``[T, E]``
        (``text_pooling="text"`` only: token ids cannot be split into sentences; use :meth:`encode_text`)."""
        if self.config.text_pooling != "text":
            raise ValueError("encode_text_tokens needs text_pooling='text'; with 'sentences' pass strings to encode_text")
        return self.text(input_ids, attention_mask)

    # ------------------------------------------------------------------ tags (MOSMOS)
    def encode_tags(self, tags: Sequence[str]) -> Tensor:
        """Tag texts -> embeddings ``[T, E]`` for the tag decoder (with the learnable CoOp context
        inside the text encoder when ``config.tag_context == "text"``)."""
        if self.tag_text_context is None:
            return self.encode_text(tags)
        batch = self.text.tokenize(tags, device=self.device)
        return self.text.forward_with_context(batch["input_ids"], batch["attention_mask"], self.tag_text_context)

    def tag_embeddings(self) -> Tensor:
        """Text embeddings ``[T, E]`` of ``config.tags``; cached in eval mode, re-encoded when training."""
        if self.training:
            self._tag_cache = None
            return self.encode_tags(self.config.tags)
        cache = self._tag_cache
        if cache is None or cache.device != self.device:
            with torch.no_grad():
                cache = self.encode_tags(self.config.tags)
            self._tag_cache = cache
        return cache

    def decode_tags(self, tokens: Tensor, tag_embeddings: Tensor | None = None) -> TagOutput:
        """Pixel-tag maps ``[B, T, N]`` and tag logits ``[B, T]`` (default tags: ``config.tags``)."""
        if tag_embeddings is None:
            tag_embeddings = self.tag_embeddings()
        return self.tag_decoder(tokens, tag_embeddings)

    def evidence_bins(self, image: Tensor) -> Tensor:
        """Every voxel's bins ``[B, F, V]`` for the evidence maps: the HU bin, then each texture
        filter's bin, offset so that they do not overlap (needs voxel statistics)."""
        if self.statistics is None:
            raise ValueError("evidence bins need voxel statistics (config.statistics_edges)")
        hu, tex = self.statistics.voxel_bins(image)
        if tex is None:
            return hu.unsqueeze(1)
        return torch.cat([hu.unsqueeze(1), tex + self.statistics.bins], dim=1)

    # ------------------------------------------------------------------ cache invalidation
    def train(self, mode: bool = True) -> CTVLP:
        self._tag_cache = None
        return super().train(mode)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        self._tag_cache = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
