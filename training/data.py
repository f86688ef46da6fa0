"""Dataset over a cache written by :mod:`training.prepare`, and the collate function.

Each item is a dict:

* ``image``: ``float32 [1, D, H, W]`` in ``[-1, 1]`` (model grid);
* ``anatomy_masks``: ``bool [A, D, H, W]`` (precomputed by ``prepare`` with
  :func:`napari_ctvlp.engine.anatomy.anatomy_masks`);
* ``present``: ``bool [A]``: the anatomy is in the scan *and* its report has sentences about it
  (the anatomies that take part in the CA-GCL losses);
* ``texts``: list of ``A`` strings, the anatomy's report sentences (``""`` where not present). In
  training they are augmented (shuffle + random non-empty subset, :mod:`training.text_aug`);
* ``report``: the whole report (findings + impression), for the MOSMOS image-report loss;
* ``labels``: ``int64 [18]`` CT-RATE labels (``-1`` unknown);
* ``tag_targets``: ``float32 [T]`` MOSMOS tag targets from the report text (if the dataset was given
  ``tags``); never from ``labels``.

Text augmentation is deterministic in ``(seed, epoch, index)`` (call :meth:`CachedCTDataset.set_epoch`),
so a resumed run sees exactly the texts an uninterrupted run would.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_ctvlp.engine.anatomy import ANATOMY_BY_NAME

logger = logging.getLogger(__name__)


def load_manifest(cache_dir: str | Path, split: str) -> dict[str, Any]:
    """The ``manifest.json`` of one split of a cache (``ValueError`` naming what is missing)."""
    path = Path(cache_dir) / split / "manifest.json"
    if not path.is_file():
        raise ValueError(f"cache {cache_dir}: {path} does not exist (run `python -m training.prepare --split {split}`)")
    manifest = json.loads(path.read_text())
    if not manifest.get("entries"):
        raise ValueError(f"cache {cache_dir}: split {split!r} has no samples")
    return manifest


def tag_targets(tags: Sequence[str], *, sentences: dict[str, Sequence[str]], report: str) -> np.ndarray:
    """MOSMOS tag targets from the report text: 1 for tags the report affirms, 0 otherwise.

    Finding terms are affirmed by a non-negated mention, anatomy phrases by any sentence about the
    anatomy (:func:`training.report_tags.report_tag_targets`). The CT-RATE labels are never used:
    they are what zero-shot evaluation scores.
    """
    from training.report_tags import report_tag_targets

    return report_tag_targets(tags, report=report, sentences=sentences)


def token_masks(masks: np.ndarray, patch_size: Sequence[int], *, weighting: str = "any") -> np.ndarray:
    """``bool [A, D, H, W]`` -> token masks ``[A, N]``, as ``CTVLP.masks_to_tokens`` computes them:
    ``"any"``: bool, does any voxel of each ViT patch belong to the anatomy; ``"fraction"``:
    float32, the share of the patch inside it."""
    a, d, h, w = masks.shape
    pd, ph, pw = patch_size
    blocks = masks.reshape(a, d // pd, pd, h // ph, ph, w // pw, pw)
    if weighting == "fraction":
        return blocks.mean(axis=(2, 4, 6), dtype=np.float32).reshape(a, -1)
    if weighting != "any":
        raise ValueError(f"weighting must be 'any' or 'fraction', got {weighting!r}")
    return blocks.any(axis=(2, 4, 6)).reshape(a, -1)


def shift_volume(array: np.ndarray, shift: Sequence[int], *, fill: Any) -> np.ndarray:
    """``array`` ``[..., D, H, W]`` moved by whole voxels ``shift`` along its last three axes; what
    enters from outside the volume is ``fill`` (no wrap-around, unlike ``np.roll``)."""
    out = np.full_like(array, fill)
    src: list[slice] = [slice(None)] * (array.ndim - 3)
    dst: list[slice] = list(src)
    for n, k in zip(array.shape[-3:], shift):
        k = int(k)
        if abs(k) >= n:
            return out
        src.append(slice(max(0, -k), n - max(0, k)))
        dst.append(slice(max(0, k), n - max(0, -k)))
    out[tuple(dst)] = array[tuple(src)]
    return out


class CachedCTDataset:
    """Map-style dataset (``torch.utils.data.Dataset`` protocol) over a prepared cache.

    Args:
        cache_dir: folder written by ``python -m training.prepare``.
        split: which split.
        augment_text: clinical-aware sentence augmentation (training); off = all sentences in
            report order (evaluation).
        keep_findings: the augmentation never drops a sentence that affirms a finding
            (:func:`training.report_tags.affirms_finding`); False (the paper's) draws any
            non-empty subset.
        seed: seed of the augmentation (with the epoch and the index).
        anatomies: anatomy names the model pools over, in query order; default the cache's.
        tags: MOSMOS tag vocabulary; adds ``tag_targets`` to every item.
        patch_size: the model's ViT patch size; adds ``token_masks`` ``bool [A, N]`` (the
            anatomy masks max-pooled to the token grid, as ``CTVLP.masks_to_tokens`` does, but in
            numpy in the loader: much faster than on the batch).
        token_weighting: ``"any"`` (bool token masks) or ``"fraction"`` (share of each patch), as
            the model's ``CTVLPConfig.token_weighting``.
        augment_image: training augmentation that keeps image and masks consistent: the volume
            and its anatomy masks move together by up to ``max_shift`` voxels per axis (air and
            "outside" enter at the border), and the intensities get a small random gain and
            offset (at most 2% and 10 HU). No flips: a left-right flip would contradict the
            report's laterality ("right lower lobe").
        max_shift: largest shift per axis ``(D, H, W)`` in voxels.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        *,
        split: str = "train",
        augment_text: bool = True,
        keep_findings: bool = False,
        seed: int = 0,
        anatomies: Sequence[str] | None = None,
        tags: Sequence[str] | None = None,
        patch_size: Sequence[int] | None = None,
        token_weighting: str = "any",
        augment_image: bool = False,
        max_shift: Sequence[int] = (3, 4, 4),
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.split = split
        self.manifest = load_manifest(cache_dir, split)
        self.entries: list[dict[str, Any]] = self.manifest["entries"]
        cache_anatomies = list(self.manifest["anatomies"])
        names = list(anatomies) if anatomies is not None else cache_anatomies
        missing = [a for a in names if a not in cache_anatomies]
        if missing:
            raise ValueError(f"cache {cache_dir} has no masks for anatomies {missing}; it has {cache_anatomies}")
        self.anatomies = tuple(names)
        self._channels = [cache_anatomies.index(a) for a in names]
        self.augment_text = augment_text
        self.keep_findings = bool(keep_findings)
        self.seed = int(seed)
        self.epoch = 0
        self.tags = tuple(tags) if tags is not None else None
        self.preprocess = dict(self.manifest["preprocess"])
        self.image_size = tuple(self.preprocess["image_size"])
        self.patch_size = tuple(int(p) for p in patch_size) if patch_size is not None else None
        self.token_weighting = token_weighting
        self.augment_image = bool(augment_image)
        self.max_shift = tuple(int(m) for m in max_shift)
        if len(self.max_shift) != 3 or min(self.max_shift) < 0:
            raise ValueError(f"max_shift must be 3 non-negative integers, got {max_shift!r}")
        if self.patch_size is not None and (len(self.patch_size) != 3 or any(
                s % p for s, p in zip(self.image_size, self.patch_size))):
            raise ValueError(f"patch_size {self.patch_size} does not divide the cache grid {self.image_size}")

    def __len__(self) -> int:
        return len(self.entries)

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation draw (call at the start of every epoch, like the sampler's)."""
        self.epoch = int(epoch)

    def _path(self, rel: str) -> Path:
        return self.cache_dir / self.split / rel

    def anatomy_texts(self, index: int) -> list[str]:
        """Per-anatomy texts of one sample (augmented if ``augment_text``; ``""`` where none)."""
        entry = self.entries[index]
        rng = random.Random(hash((self.seed, self.epoch, int(index))) & 0xFFFFFFFF)
        texts = []
        for name in self.anatomies:
            sentences = list(entry["sentences"].get(name, ()))
            if not sentences:
                texts.append("")
            elif self.augment_text:
                from training.report_tags import affirms_finding
                from training.text_aug import augment_sentences

                texts.append(augment_sentences(sentences, generator=rng,
                                               keep=affirms_finding if self.keep_findings else None))
            else:
                texts.append(" ".join(sentences))
        return texts

    def _augment(self, index: int, image: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Shift image and masks together; random gain/offset of the intensities (see ``augment_image``)."""
        rng = np.random.default_rng([self.seed, self.epoch, int(index), 11])
        shift = [int(rng.integers(-m, m + 1)) for m in self.max_shift]
        lo, hi = (float(v) for v in self.preprocess.get("hu_window", (-1000.0, 1000.0)))
        air = float(np.clip(2.0 * (float(self.preprocess.get("pad_hu", lo)) - lo) / (hi - lo) - 1.0, -1.0, 1.0))
        if any(shift):
            image = shift_volume(image, shift, fill=np.float32(air))
            masks = shift_volume(masks, shift, fill=False)
        gain = 1.0 + float(rng.uniform(-0.02, 0.02))
        offset = float(rng.uniform(-10.0, 10.0)) * 2.0 / (hi - lo)
        image = np.clip(image * np.float32(gain) + np.float32(offset), -1.0, 1.0).astype(np.float32)
        return image, masks

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        if not 0 <= index < len(self.entries):
            raise IndexError(f"index {index} out of range for {len(self.entries)} samples")
        entry = self.entries[index]
        image = np.load(self._path(entry["image"]), mmap_mode="r")
        packed = np.load(self._path(entry["anatomy"]), mmap_mode="r")
        width = int(entry["shape"][-1])
        masks = np.unpackbits(np.asarray(packed[self._channels]), axis=-1, count=width).astype(bool)
        texts = self.anatomy_texts(index)
        image = np.asarray(image, dtype=np.float32)
        if self.augment_image:
            image, masks = self._augment(index, image, masks)
        mask_present = masks.reshape(masks.shape[0], -1).any(axis=1)
        present = mask_present & np.array([bool(t) for t in texts])
        report = " ".join(s for s in (entry.get("findings", ""), entry.get("impression", "")) if s).strip()
        labels = np.asarray(entry["labels"], dtype=np.int64)
        item: dict[str, Any] = {
            "index": int(index),
            "image": torch.from_numpy(np.ascontiguousarray(image))[None],
            "anatomy_masks": torch.from_numpy(masks),
            "present": torch.from_numpy(present),
            "texts": texts,
            "sentences": [list(entry["sentences"].get(a, ())) for a in self.anatomies],
            "report": report or "No report.",
            "labels": torch.from_numpy(labels),
        }
        if self.patch_size is not None:
            item["token_masks"] = torch.from_numpy(token_masks(masks, self.patch_size, weighting=self.token_weighting))
        if self.tags is not None:
            sentences = {a: entry["sentences"].get(a, ()) for a in self.anatomies}
            item["tag_targets"] = torch.from_numpy(
                tag_targets(self.tags, sentences=sentences, report=report)
            )
        return item


def make_collate(tokenizer: Any, *, max_length: int = 256,
                 report_max_length: int | None = None) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """Collate function that stacks tensors and tokenizes the texts with the model's tokenizer.

    Anatomy texts are cut at ``max_length`` tokens, whole reports at ``report_max_length`` (default
    ``max_length``).

    The returned batch has, besides the stacked ``image`` ``[B, 1, D, H, W]``, ``anatomy_masks``
    ``[B, A, D, H, W]``, ``present`` ``[B, A]``, ``labels`` ``[B, 18]`` (and ``tag_targets``):

    * ``text_input_ids``/``text_attention_mask`` ``[T, L]``: the present anatomy texts only;
    * ``text_index`` ``[B, A]`` long: row of each (sample, anatomy) text in those, ``-1`` if absent;
    * ``report_input_ids``/``report_attention_mask`` ``[B, L]``: the whole reports;
    * ``present_texts`` and ``reports``: the same texts as strings (for sentence pooling);
    * ``anatomy_sentences``: per scan, per anatomy, the un-augmented sentences (sentence contrast).
    """
    import torch

    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        if not items:
            raise ValueError("collate got an empty batch")
        batch: dict[str, Any] = {
            key: torch.stack([it[key] for it in items])
            for key in ("image", "anatomy_masks", "token_masks", "present", "labels", "tag_targets")
            if key in items[0]
        }
        batch["index"] = torch.tensor([it["index"] for it in items])
        present = batch["present"]
        text_index = torch.full(present.shape, -1, dtype=torch.long)
        texts: list[str] = []
        for b, it in enumerate(items):
            for a, text in enumerate(it["texts"]):
                if present[b, a]:
                    text_index[b, a] = len(texts)
                    texts.append(text)
        batch["text_index"] = text_index
        if texts:
            tok = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            batch["text_input_ids"], batch["text_attention_mask"] = tok["input_ids"], tok["attention_mask"]
        else:
            batch["text_input_ids"] = torch.zeros((0, 1), dtype=torch.long)
            batch["text_attention_mask"] = torch.zeros((0, 1), dtype=torch.long)
        tok = tokenizer([it["report"] for it in items], padding=True, truncation=True,
                        max_length=report_max_length or max_length, return_tensors="pt")
        batch["report_input_ids"], batch["report_attention_mask"] = tok["input_ids"], tok["attention_mask"]
        batch["texts"] = [it["texts"] for it in items]
        batch["anatomy_sentences"] = [it.get("sentences", [[] for _ in it["texts"]]) for it in items]
        batch["present_texts"] = texts  # row i of text_input_ids, as strings (sentence pooling)
        batch["reports"] = [it["report"] for it in items]
        return batch

    return collate
