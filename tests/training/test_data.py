"""training.prepare (cache, resume, CT-RATE metadata) and training.data (items, collate)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from napari_ctvlp.engine.anatomy import ABNORMALITY_NAMES, ANATOMY_NAMES
from napari_ctvlp.engine.volume import CTVolume
from phantom_cache import TINY_GRID, tiny_preprocess_config, write_phantoms
from training.data import CachedCTDataset, make_collate, tag_targets
from training.prepare import apply_metadata, prepare_cache, unpack_masks


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_phantoms(tmp_path_factory.mktemp("phantoms"), n=5, seed=3)


@pytest.fixture(scope="module")
def cache(phantom_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cache")
    cfg = tiny_preprocess_config()
    # 2 volumes with 2 processes, then the rest in-process: resumes what the first run wrote
    first = prepare_cache(phantom_root, out, preprocess_config=cfg, workers=2, limit=2)
    assert (first.n_written, first.n_skipped, first.n_failed) == (2, 0, 0)
    second = prepare_cache(phantom_root, out, preprocess_config=cfg, workers=1)
    assert (second.n_written, second.n_skipped, second.n_failed) == (3, 2, 0)
    return out


def test_cache_is_valid_and_complete(cache: Path, phantom_root: Path) -> None:
    info = json.loads((cache / "cache.json").read_text())
    assert info["preprocess"] == tiny_preprocess_config().to_dict()
    assert info["anatomies"] == list(ANATOMY_NAMES)
    manifest = json.loads((cache / "train" / "manifest.json").read_text())
    assert len(manifest["entries"]) == 5
    import pandas as pd

    csv_labels = pd.read_csv(phantom_root / "multi_abnormality_labels" / "train_predicted_labels.csv")
    for entry in manifest["entries"]:
        image = np.load(cache / "train" / entry["image"], mmap_mode="r")
        assert isinstance(image, np.memmap)
        assert image.shape == TINY_GRID and image.dtype == np.float16
        assert -1.0 <= float(image.min()) < float(image.max()) <= 1.0
        organs = np.load(cache / "train" / entry["organs"], mmap_mode="r")
        assert organs.shape == TINY_GRID and organs.dtype == np.uint8 and organs.max() > 0
        masks = unpack_masks(np.load(cache / "train" / entry["anatomy"]), TINY_GRID[-1])
        assert masks.shape == (len(ANATOMY_NAMES), *TINY_GRID)
        assert masks[ANATOMY_NAMES.index("lung")].sum() > 100  # every phantom has lungs
        assert masks[ANATOMY_NAMES.index("body")].sum() > masks[ANATOMY_NAMES.index("lung")].sum()
        row = csv_labels[csv_labels.VolumeName == entry["volume_name"]].iloc[0]
        assert entry["labels"] == [int(row[a]) for a in ABNORMALITY_NAMES]
        assert entry["sentences"]["lung"], entry["findings"]  # phantom reports describe the lungs


def test_second_run_skips_everything_and_redoes_incomplete(cache: Path, phantom_root: Path) -> None:
    cfg = tiny_preprocess_config()
    again = prepare_cache(phantom_root, cache, preprocess_config=cfg)
    assert (again.n_written, again.n_skipped) == (0, 5)
    manifest = json.loads((cache / "train" / "manifest.json").read_text())
    victim = cache / "train" / manifest["entries"][1]["dir"]
    (victim / "meta.json").unlink()  # as if killed before the sample was complete
    redo = prepare_cache(phantom_root, cache, preprocess_config=cfg)
    assert (redo.n_written, redo.n_skipped) == (1, 4)
    assert json.loads((cache / "train" / "manifest.json").read_text()) == manifest


def test_prepare_refuses_a_different_grid_and_bad_arguments(cache: Path, phantom_root: Path, tmp_path: Path) -> None:
    from training.prepare import default_preprocess_config

    with pytest.raises(ValueError, match="another preprocess"):
        prepare_cache(phantom_root, cache, preprocess_config=default_preprocess_config((32, 32, 64)))
    with pytest.raises(ValueError, match="segmentation"):
        prepare_cache(phantom_root, tmp_path / "c", preprocess_config=tiny_preprocess_config(), segmentation="magic")
    with pytest.raises(ValueError, match="radiology_text_reports"):
        prepare_cache(tmp_path, tmp_path / "c", preprocess_config=tiny_preprocess_config())
    with pytest.raises(ValueError, match="--split valid"):
        prepare_cache(phantom_root, tmp_path / "c", preprocess_config=tiny_preprocess_config(), split="valid")


def test_apply_metadata_fixes_raw_values_and_spacing() -> None:
    raw = np.full((4, 5, 6), 24, dtype=np.int16)  # stored value 24 = -1000 HU with intercept -1024
    vol = CTVolume(raw, (1.0, 1.0, 1.0), np.diag([-1.0, -1.0, 1.0, 1.0]))
    row = {"XYSpacing": "[0.7, 0.8]", "ZSpacing": 1.5, "RescaleSlope": 1.0, "RescaleIntercept": -1024.0}
    fixed = apply_metadata(vol, row)
    assert fixed.spacing == (1.5, 0.7, 0.8)
    np.testing.assert_allclose(np.diag(fixed.affine)[:3], [-0.8, -0.7, 1.5])  # directions kept
    np.testing.assert_allclose(fixed.array, -1000.0)
    # values that are already HU are not shifted twice
    hu = CTVolume(np.full((4, 5, 6), -1000, dtype=np.int16), (1.0, 1.0, 1.0), np.eye(4))
    np.testing.assert_allclose(apply_metadata(hu, row).array, -1000)
    assert apply_metadata(hu, None) is hu
    with pytest.raises(ValueError, match="rescale"):
        apply_metadata(hu, row, rescale="sometimes")


def test_dataset_items_and_collate(cache: Path) -> None:
    from napari_ctvlp.engine.networks.config import DEFAULT_TAGS

    ds = CachedCTDataset(cache, split="train", augment_text=True, seed=1, tags=DEFAULT_TAGS)
    assert len(ds) == 5
    item = ds[0]
    a = len(ANATOMY_NAMES)
    assert item["image"].shape == (1, *TINY_GRID) and str(item["image"].dtype) == "torch.float32"
    assert item["anatomy_masks"].shape == (a, *TINY_GRID) and str(item["anatomy_masks"].dtype) == "torch.bool"
    assert item["present"].shape == (a,) and bool(item["present"][ANATOMY_NAMES.index("lung")])
    assert item["labels"].shape == (18,) and item["tag_targets"].shape == (len(DEFAULT_TAGS),)
    assert len(item["texts"]) == a and all((t != "") == bool(p) or not p for t, p in zip(item["texts"], item["present"]))
    # augmentation: deterministic per (seed, epoch, index), a subset of the sentences
    assert ds.anatomy_texts(0) == ds.anatomy_texts(0)
    lung_sentences = ds.entries[0]["sentences"]["lung"]
    epochs = []
    for epoch in range(6):
        ds.set_epoch(epoch)
        text = ds.anatomy_texts(0)[ANATOMY_NAMES.index("lung")]
        kept = [s for s in lung_sentences if s in text]
        assert kept and len(text) == len(" ".join(kept))  # a non-empty subset, nothing else
        epochs.append(text)
    if len(lung_sentences) > 1:
        assert len(set(epochs)) > 1
    plain = CachedCTDataset(cache, split="train", augment_text=False)
    assert plain.anatomy_texts(0)[ANATOMY_NAMES.index("lung")] == " ".join(lung_sentences)
    # with keep_findings no sentence that states a finding is ever dropped; by default any may go
    from training.report_tags import affirms_finding

    stated = [s for i in range(len(ds)) for name in ds.anatomies for s in ds.entries[i]["sentences"].get(name, ())
              if affirms_finding(s)]
    assert stated, "the tiny cache's reports state no finding"
    loose = ds
    ds = CachedCTDataset(cache, split="train", augment_text=True, keep_findings=True, seed=1, tags=DEFAULT_TAGS)
    dropped = 0
    for epoch in range(8):
        ds.set_epoch(epoch)
        loose.set_epoch(epoch)
        for i in range(len(ds)):
            for name, text, loose_text in zip(ds.anatomies, ds.anatomy_texts(i), loose.anatomy_texts(i)):
                for s in ds.entries[i]["sentences"].get(name, ()):
                    if affirms_finding(s):
                        assert s in text, (name, s, text)
                        dropped += s not in loose_text
    assert dropped > 0

    from transformers import AutoTokenizer

    from napari_ctvlp.engine.networks.text_encoder import resolve_text_encoder

    tokenizer = AutoTokenizer.from_pretrained(resolve_text_encoder("minilm"))
    batch = make_collate(tokenizer, max_length=24)([ds[0], ds[1], ds[2]])
    assert batch["image"].shape == (3, 1, *TINY_GRID)
    assert batch["anatomy_masks"].shape == (3, a, *TINY_GRID)
    present = batch["present"]
    assert int(present.sum()) == batch["text_input_ids"].shape[0]
    assert batch["text_input_ids"].shape[1] <= 24
    idx = batch["text_index"]
    assert bool(((idx >= 0) == present).all())
    assert sorted(idx[present].tolist()) == list(range(int(present.sum())))
    assert batch["report_input_ids"].shape[0] == 3
    # the sentence contrast gets every sentence, never the augmented subset
    lung = ANATOMY_NAMES.index("lung")
    assert batch["anatomy_sentences"][0][lung] == list(lung_sentences)
    assert [len(row) for row in batch["anatomy_sentences"]] == [a, a, a]


def test_tag_targets_come_from_the_report_text_with_negation() -> None:
    report = ("Left pleural effusion. No emphysema. A stent is seen. Pericardial effusion was not observed. "
              "Coronary arteries show no calcified plaques. Calcified atheroma plaques in the LAD.")
    tags = ("pleural effusion", "emphysema", "lungs", "heart", "stent", "pericardial effusion",
            "coronary artery wall calcification")
    out = tag_targets(tags, sentences={"lung": ("Left pleural effusion.", "No emphysema."), "heart": ()}, report=report)
    assert out.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]


def test_item_tag_targets_ignore_the_label_file(cache: Path, tmp_path: Path) -> None:
    """Flipping every label of the cache changes no tag target: training never sees the labels."""
    from napari_ctvlp.engine.networks.config import DEFAULT_TAGS

    cache = Path(shutil.copytree(cache, tmp_path / "cache"))
    before = CachedCTDataset(cache, augment_text=False, tags=DEFAULT_TAGS)[0]["tag_targets"].clone()
    manifest = cache / "train" / "manifest.json"
    doc = json.loads(manifest.read_text())
    for e in doc["entries"]:
        e["labels"] = [1 - v if v in (0, 1) else v for v in e["labels"]]
    manifest.write_text(json.dumps(doc))
    after = CachedCTDataset(cache, augment_text=False, tags=DEFAULT_TAGS)[0]
    assert after["labels"].tolist() == doc["entries"][0]["labels"]  # the flipped labels were read
    assert bool((after["tag_targets"] == before).all()) and before.sum() > 0


@pytest.mark.realdata
def test_prepare_real_ct_with_totalsegmentator_masks(realdata: Path, tmp_path: Path) -> None:
    """A real CT in the CT-RATE layout with TotalSegmentator labels as masks:DIR."""
    import pandas as pd

    ct, seg = realdata / "example_ct.nii.gz", realdata / "example_seg_fast_force_split.nii.gz"
    if not ct.is_file() or not seg.is_file():
        pytest.skip("example_ct / example_seg_fast_force_split missing from the real data folder")
    root = tmp_path / "ds"
    name = "train_1_a_1.nii.gz"
    (root / "train" / "train_1" / "train_1_a").mkdir(parents=True)
    (root / "train" / "train_1" / "train_1_a" / name).symlink_to(ct)
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / name).symlink_to(seg)
    (root / "radiology_text_reports").mkdir()
    pd.DataFrame([{"VolumeName": name, "ClinicalInformation_EN": "", "Technique_EN": "",
                   "Findings_EN": "Small bilateral pleural effusion. Heart size normal.",
                   "Impressions_EN": "Pleural effusion."}]).to_csv(root / "radiology_text_reports" / "train_reports.csv", index=False)
    result = prepare_cache(root, tmp_path / "cache", preprocess_config=tiny_preprocess_config(),
                           segmentation=f"masks:{tmp_path / 'masks'}")
    assert result.n_failed == 0, result.failures
    entry = json.loads(result.manifest.read_text())["entries"][0]
    assert entry["labels"] == [-1] * 18  # no labels CSV
    present = dict(zip(ANATOMY_NAMES, entry["anatomy_present"]))
    assert present["lung"] and present["body"]
    assert not present["heart"]  # the abdominal example has lung bases but no heart label (51)
    assert entry["sentences"]["lung"] and entry["sentences"]["heart"]
    shutil.rmtree(tmp_path / "cache")


def test_token_masks_match_the_model(cache: Path) -> None:
    import torch

    from napari_ctvlp.engine.networks.config import CTVLPConfig
    from napari_ctvlp.engine.networks.ctvlp import CTVLP

    for weighting in ("fraction", "any"):
        model = CTVLP(CTVLPConfig.tiny(token_weighting=weighting))
        ds = CachedCTDataset(cache, split="train", patch_size=model.config.patch_size, token_weighting=weighting)
        item = ds[2]
        expected = model.masks_to_tokens(item["anatomy_masks"][None])[0]
        assert item["token_masks"].shape == (len(ANATOMY_NAMES), model.config.num_tokens)
        torch.testing.assert_close(item["token_masks"], expected)
    frac = CachedCTDataset(cache, split="train", patch_size=(8, 8, 8), token_weighting="fraction")[2]["token_masks"]
    assert frac.dtype == torch.float32 and 0 < float(frac[frac > 0].min()) < 1.0  # partial tokens exist
    with pytest.raises(ValueError, match="does not divide"):
        CachedCTDataset(cache, split="train", patch_size=(5, 8, 8))


def test_shift_volume_moves_without_wrapping() -> None:
    from training.data import shift_volume

    a = np.arange(2 * 4 * 5 * 6, dtype=np.float32).reshape(2, 4, 5, 6)
    out = shift_volume(a, (1, -2, 0), fill=-1.0)
    np.testing.assert_array_equal(out[:, 1:, :3, :], a[:, :3, 2:, :])
    assert (out[:, 0] == -1).all() and (out[:, :, 3:] == -1).all()
    np.testing.assert_array_equal(shift_volume(a, (0, 0, 0), fill=0.0), a)
    assert (shift_volume(a, (0, 9, 0), fill=7.0) == 7.0).all()


def test_image_augmentation_moves_masks_with_the_image(cache: Path) -> None:
    import torch

    plain = CachedCTDataset(cache, split="train", augment_text=False)
    aug = CachedCTDataset(cache, split="train", augment_text=False, augment_image=True, max_shift=(2, 2, 2), seed=3)
    for i in range(len(plain)):
        a, b = plain[i], aug[i]
        if not torch.equal(a["anatomy_masks"], b["anatomy_masks"]):
            break
    else:
        pytest.fail("no item was shifted")
    # find the shift that maps the plain masks onto the augmented ones; the image moved by the same
    from training.data import shift_volume

    m, n = a["anatomy_masks"].numpy(), b["anatomy_masks"].numpy()
    hits = [(dz, dy, dx) for dz in range(-2, 3) for dy in range(-2, 3) for dx in range(-2, 3)
            if np.array_equal(shift_volume(m, (dz, dy, dx), fill=False), n)]
    assert len(hits) == 1
    moved = shift_volume(a["image"].numpy()[0], hits[0], fill=-1.0)
    inside = n.any(0)
    corr = np.corrcoef(moved[inside], b["image"].numpy()[0][inside])[0, 1]
    assert corr > 0.99 and float(np.abs(moved[inside] - b["image"].numpy()[0][inside]).max()) < 0.05
    assert b["image"].min() >= -1.0 and b["image"].max() <= 1.0
    assert torch.equal(aug[i]["image"], b["image"])  # deterministic per (seed, epoch, index)
    aug.set_epoch(1)
    assert not torch.equal(aug[i]["image"], b["image"])
