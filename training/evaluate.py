"""Zero-shot evaluation of a checkpoint: per-abnormality metrics, template robustness, geometry.

``python -m training.evaluate --checkpoint C --data CACHE_OR_ROOT [--split valid] [--out DIR]``

``--data`` is a cache from :mod:`training.prepare` or a dataset in the CT-RATE layout (prepared
on the fly into ``DIR/cache`` with the checkpoint's preprocessing). Every volume goes through the
inference path (:func:`napari_ctvlp.engine.zero_shot.encode_volume` and
:func:`~napari_ctvlp.engine.zero_shot.score_abnormalities`); the probability of an abnormality is
the one in its own anatomy (``engine.anatomy``).

Metrics (DESIGN.md): per abnormality AUC (scikit-learn), the threshold at the ROC point closest to
(0, 1), then accuracy, balanced accuracy, weighted F1, precision, specificity and sensitivity;
their mean over abnormalities; the same for every prompt template alone, and mean +- std over
templates. Embedding geometry: the histogram of cosine similarities between text embeddings of
different anatomies (a collapsed text space peaks near 1) and its mean, and a t-SNE of the
anatomy embeddings (image and text side) coloured by anatomy.

Writes ``metrics.json``, ``metrics.md``, ``text_similarity_hist.png``, ``tsne_anatomy.png`` and
``scores.csv`` (one row per volume) into ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_ctvlp.engine.anatomy import ABNORMALITY_BY_NAME, ABNORMALITY_NAMES, PROMPT_TEMPLATES
from napari_ctvlp.engine.volume import ProgressCallback, report
from training.geometry import inter_anatomy_similarities, same_scan_similarities, write_plots

logger = logging.getLogger(__name__)

METRIC_KEYS = ("auc", "accuracy", "balanced_accuracy", "weighted_f1", "precision", "specificity", "sensitivity")


@dataclass(frozen=True)
class EvaluationResult:
    """Summary of :func:`evaluate`; the full record is ``metrics`` (also in ``metrics.json``)."""

    out_dir: Path
    mean_auc: float
    template_auc_mean: float
    template_auc_std: float
    inter_anatomy_text_cosine: float
    metrics: dict[str, Any]


def binary_metrics(y_true: np.ndarray, score: np.ndarray, *, threshold: float | None = None) -> dict[str, float]:
    """The DESIGN.md metrics of one abnormality (NaN when only one class is present).

    AUC is :func:`sklearn.metrics.roc_auc_score`; the threshold is the ROC point (of
    :func:`sklearn.metrics.roc_curve`) closest to (0, 1) -- chosen on these very scores, so the
    metrics below are optimistic -- unless ``threshold`` is given (an operating point chosen on
    another split, :func:`choose_operating_points`); the other metrics follow from the
    confusion matrix at that threshold (weighted F1 = support-weighted mean of both classes' F1,
    as ``f1_score(average="weighted")``; precision of the positive class).
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    y = np.asarray(y_true).astype(int)
    s = np.asarray(score, dtype=float)
    keep = ~np.isnan(s) & (y >= 0)
    y, s = y[keep], s[keep]
    out = {k: float("nan") for k in METRIC_KEYS}
    out.update(n=int(len(y)), n_positive=int(y.sum()),
               threshold=float("nan") if threshold is None else float(threshold))
    if len(y) == 0 or y.min() == y.max():
        return out
    if threshold is None or not math.isfinite(float(threshold)):
        fpr, tpr, thr = roc_curve(y, s)
        best = int(np.argmin(fpr**2 + (1.0 - tpr) ** 2))
        threshold = float(thr[best]) if np.isfinite(thr[best]) else float(np.nextafter(s.max(), np.inf))
    threshold = float(threshold)
    pred = s >= threshold
    pos = y == 1
    tp, fp = int((pred & pos).sum()), int((pred & ~pos).sum())
    fn, tn = int((~pred & pos).sum()), int((~pred & ~pos).sum())
    sens = tp / (tp + fn)
    spec = tn / (tn + fp)

    def f1(a: int, b: int, c: int) -> float:  # tp, fp, fn of one class
        return 2 * a / (2 * a + b + c) if a + b + c else 0.0

    n_pos, n_neg = tp + fn, tn + fp
    out.update(
        auc=float(roc_auc_score(y, s)), threshold=threshold, accuracy=(tp + tn) / len(y),
        balanced_accuracy=(sens + spec) / 2.0,
        weighted_f1=(n_pos * f1(tp, fp, fn) + n_neg * f1(tn, fn, fp)) / len(y),
        precision=tp / (tp + fp) if tp + fp else 0.0, specificity=spec, sensitivity=sens,
    )
    return out


def _mean_metrics(per_abnormality: dict[str, dict[str, float]]) -> dict[str, float]:
    out = {}
    for k in METRIC_KEYS:
        vals = [m[k] for m in per_abnormality.values() if not math.isnan(m[k])]
        out[k] = float(np.mean(vals)) if vals else float("nan")
    out["n_abnormalities"] = int(sum(not math.isnan(m["auc"]) for m in per_abnormality.values()))
    return out


def metrics_table(labels: np.ndarray, probs: np.ndarray, names: tuple[str, ...], *,
                  thresholds: dict[str, float] | None = None) -> dict[str, Any]:
    """Per-abnormality metrics and their mean; ``labels``/``probs`` are ``[n_volumes, K]``.

    ``thresholds``: fixed operating points per abnormality (else each is chosen on these scores).
    """
    per = {n: binary_metrics(labels[:, k], probs[:, k], threshold=(thresholds or {}).get(n))
           for k, n in enumerate(names)}
    return {"per_abnormality": per, "mean": _mean_metrics(per)}


def choose_operating_points(labels: np.ndarray, probs: np.ndarray, names: tuple[str, ...]) -> dict[str, float]:
    """Per abnormality, the probability threshold at the ROC point closest to (0, 1) on these
    scores (NaN where the split has one class only). Choose them on a split that is *not* the one
    reported, and store them with the checkpoint (:func:`store_operating_points`)."""
    return {n: binary_metrics(labels[:, k], probs[:, k])["threshold"] for k, n in enumerate(names)}


def store_operating_points(checkpoint: str | Path, thresholds: dict[str, float], *, chosen_on: dict[str, Any]) -> Path:
    """Write ``operating_points`` into a checkpoint's ``config.json`` (atomic replace); the app
    then says positive/negative per finding. Returns the config path."""
    from napari_ctvlp.engine.checkpoint import CONFIG_NAME
    from napari_ctvlp.io import atomic_write

    directory = Path(checkpoint)
    directory = directory if directory.is_dir() else directory.parent
    path = directory / CONFIG_NAME
    doc = json.loads(path.read_text())
    doc["operating_points"] = {
        "thresholds": {k: (None if v is None or not math.isfinite(v) else float(v)) for k, v in thresholds.items()},
        "rule": "ROC point closest to (0, 1) of the mean-over-templates probability",
        "chosen_on": chosen_on,
    }
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(doc, indent=1)))


def _encode_cache(model: Any, cache_dir: Path, split: str, *, device: str,
                  progress: ProgressCallback | None) -> dict[str, Any]:
    """Run the zero-shot path on every cached volume; collect probabilities and embeddings."""
    import torch

    from napari_ctvlp.engine.evidence_maps import compute_evidence, supports_evidence
    from napari_ctvlp.engine.preprocess import PreparedVolume, PreprocessConfig
    from napari_ctvlp.engine.zero_shot import encode_volume, score_abnormalities
    from training.data import CachedCTDataset

    ds = CachedCTDataset(cache_dir, split=split, augment_text=False, anatomies=model.config.anatomies)
    config = PreprocessConfig.from_dict(ds.preprocess)
    if tuple(config.image_size) != tuple(model.config.image_size):
        raise ValueError(f"--data {cache_dir}: cache grid {config.image_size} != model input grid {model.config.image_size}")
    n = len(ds)
    k_names = tuple(ABNORMALITY_NAMES)
    probs = np.full((n, len(k_names)), np.nan)
    per_template = np.full((n, len(k_names), len(PROMPT_TEMPLATES)), np.nan)
    labels = np.zeros((n, len(k_names)), dtype=int)
    evidence = np.full((n, len(k_names)), np.nan) if model.evidence is not None else None
    # with a prompt evidence head the prompts are scored by it; the CA-GCL embedding scores are kept beside
    embedding = np.full((n, len(k_names), len(PROMPT_TEMPLATES)), np.nan) if model.prompt_evidence is not None \
        else None
    image_emb, text_emb, text_owner = [], [], []
    for i, entry in enumerate(ds.entries):
        image = np.asarray(np.load(cache_dir / split / entry["image"], mmap_mode="r"), dtype=np.float32)
        organs = np.asarray(np.load(cache_dir / split / entry["organs"], mmap_mode="r"))
        prepared = PreparedVolume(image=image, organs=organs, model_affine=np.eye(4), source_affine=np.eye(4),
                                  source_shape=tuple(image.shape), source_spacing=tuple(config.spacing_mm), config=config)
        feats = encode_volume(model, prepared, device=device)
        scores = score_abnormalities(model, feats, templates=PROMPT_TEMPLATES, abnormalities=k_names)
        for k, name in enumerate(k_names):
            j = scores.primary_index(name)
            if j is not None:
                probs[i, k] = scores.probability[k, j]
                per_template[i, k] = scores.per_template[k, j]
        if embedding is not None:
            plain = score_abnormalities(model, dataclasses.replace(feats, prompt_cells=None),
                                        templates=PROMPT_TEMPLATES, abnormalities=k_names)
            for k, name in enumerate(k_names):
                j = plain.primary_index(name)
                if j is not None:
                    embedding[i, k] = plain.per_template[k, j]
        if evidence is not None and supports_evidence(model, feats):
            evidence[i] = compute_evidence(model, feats).probabilities
        labels[i] = np.asarray(entry["labels"], dtype=int)
        emb = feats.anatomy_embeddings.detach().cpu().numpy()
        texts = ds.anatomy_texts(i)
        present = [j for j, t in enumerate(texts) if t and feats.present[j]]
        if present:
            with torch.inference_mode():
                t_emb = model.encode_text([texts[j] for j in present]).float().cpu().numpy()
            for row, j in zip(t_emb, present):
                image_emb.append(emb[j])
                text_emb.append(row)
                text_owner.append((i, j))
        report(progress, i + 1, n, entry["volume_name"])
    return {"probs": probs, "per_template": per_template, "labels": labels, "names": k_names, "evidence": evidence,
            "embedding": embedding,
            "volumes": [e["volume_name"] for e in ds.entries], "image_emb": np.asarray(image_emb),
            "text_emb": np.asarray(text_emb), "owner": np.asarray(text_owner, dtype=int).reshape(-1, 2),
            "anatomies": tuple(model.config.anatomies)}


def supervision_of(meta: dict[str, Any]) -> dict[str, Any]:
    """Which evaluation labels, if any, the checkpoint saw in training (from its training record).

    ``label_file_used``: the CT-RATE label CSV was a training target (True for checkpoints trained
    before tag targets came from the report text: their MOSMOS tags for the 18 finding terms were the
    labels themselves); ``finding_tags_from_report_text``: finding terms decoded as MOSMOS tags with
    targets from the report text (weak supervision, as in MOSMOS); ``None``: unknown (no record).
    """
    training = meta.get("training") if isinstance(meta, dict) else None
    if not isinstance(training, dict) or "params" not in training:
        return {"label_file_used": None, "tag_targets": None, "finding_tags_from_report_text": None,
                "note": "the checkpoint has no training record"}
    if isinstance(training.get("supervision"), dict):
        return dict(training["supervision"])
    mosmos = bool(training["params"].get("loss", {}).get("mosmos"))
    tags = training["params"].get("model", {}).get("tags") or []
    from training.report_tags import FINDING_TERMS

    seen = [t for t in (tags or FINDING_TERMS) if t.lower() in FINDING_TERMS] if mosmos else []
    return {"label_file_used": bool(seen), "tag_targets": "label_file" if seen else None,
            "finding_tags_from_report_text": [], "labels_seen": seen,
            "note": "trained before tag targets came from the report text: the MOSMOS tag targets of these "
                    "finding terms were the evaluation labels, so their AUCs are not zero-shot"}


def _fmt(v: float) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def markdown_report(metrics: dict[str, Any]) -> str:
    """Markdown tables of :func:`evaluate`'s ``metrics`` dict."""
    sup = metrics.get("supervision", {})
    lines = [f"# Zero-shot evaluation: {metrics['checkpoint']}", "",
             f"Supervision in training: label file used: **{sup.get('label_file_used')}**; tag targets: "
             f"{sup.get('tag_targets')}; finding terms weakly supervised from report text: "
             f"{', '.join(sup.get('finding_tags_from_report_text') or []) or 'none'}"
             + (f". {sup['note']}." if sup.get("note") else "."), "",
             f"Data: `{metrics['data']}` split `{metrics['split']}`, {metrics['n_volumes']} volumes; "
             f"score = mean probability over {len(metrics['templates'])} prompt templates.", "",
             "| abnormality | n+ / n | " + " | ".join(METRIC_KEYS) + " |",
             "|---|---|" + "---|" * len(METRIC_KEYS)]
    for name, m in metrics["ensemble"]["per_abnormality"].items():
        lines.append(f"| {name} | {m['n_positive']} / {m['n']} | " + " | ".join(_fmt(m[k]) for k in METRIC_KEYS) + " |")
    mean = metrics["ensemble"]["mean"]
    lines.append("| **mean** | | " + " | ".join(f"**{_fmt(mean[k])}**" for k in METRIC_KEYS) + " |")
    lines.append("")
    lines.append("Thresholds above: the ROC point closest to (0, 1) chosen on this split itself (optimistic).")
    if metrics.get("at_operating_points"):
        chosen = (metrics.get("operating_points") or {}).get("chosen_on") or {}
        lines += ["", f"## At the operating points chosen on split `{chosen.get('split')}` "
                      f"({chosen.get('n_volumes')} volumes, not this split)", "",
                  "| abnormality | threshold | " + " | ".join(k for k in METRIC_KEYS if k != "auc") + " |",
                  "|---|---|" + "---|" * (len(METRIC_KEYS) - 1)]
        for name, m in metrics["at_operating_points"]["per_abnormality"].items():
            lines.append(f"| {name} | {_fmt(m['threshold'])} | "
                         + " | ".join(_fmt(m[k]) for k in METRIC_KEYS if k != "auc") + " |")
        mean = metrics["at_operating_points"]["mean"]
        lines.append("| **mean** | | " + " | ".join(f"**{_fmt(mean[k])}**" for k in METRIC_KEYS if k != "auc") + " |")
    lines += ["", "## Per prompt template (mean over abnormalities)", "",
              "| template | " + " | ".join(METRIC_KEYS) + " |", "|---|" + "---|" * len(METRIC_KEYS)]
    for t in metrics["per_template"]:
        lines.append(f"| {t['positive']} / {t['negative']} | " + " | ".join(_fmt(t['mean'][k]) for k in METRIC_KEYS) + " |")
    over = metrics["over_templates"]
    lines.append("| **mean +- std** | " + " | ".join(f"{_fmt(over[k]['mean'])} +- {_fmt(over[k]['std'])}"
                                                   for k in METRIC_KEYS) + " |")
    emb = metrics.get("embedding_zero_shot")
    if emb:
        lines += ["", f"Prompts are scored by: {metrics.get('scoring')}. The CA-GCL anatomy-embedding scores of the "
                  f"same checkpoint: mean AUC {_fmt(emb['ensemble']['mean']['auc'])}, over templates "
                  f"{_fmt(emb['template_auc_mean'])} +- {_fmt(emb['template_auc_std'])}."]
    rec = metrics.get("evidence_recognition")
    if rec:
        lines += ["", "## Evidence head recognition (trained on report-text finding tags; not zero-shot)", "",
                  "| abnormality | AUC |", "|---|---|"]
        lines += [f"| {name} | {_fmt(m['auc'])} |" for name, m in rec["per_abnormality"].items()]
        lines.append(f"| **mean** | **{_fmt(rec['mean']['auc'])}** |")
    loc = metrics.get("localisation")
    if loc:
        lines += ["", f"## Localisation ({loc['n_pairs']} lesion/finding pairs in {loc['n_scans']} phantoms)", "",
                  "| map | pointing (<= %g mm) | voxel AUROC | cross-finding correlation |" % loc["tolerance_mm"],
                  "|---|---|---|---|"]
        for kind in loc["pointing"]:
            cross = loc["cross_finding_correlation"].get(kind)
            lines.append(f"| {kind} | {_fmt(loc['pointing'][kind])} | {_fmt(loc['voxel_auroc'][kind])} | "
                         f"{_fmt(cross) if cross is not None else '-'} |")
    geo = metrics["geometry"]
    lines += ["", "## Embedding geometry", "",
              f"Mean cosine similarity between text embeddings of different anatomies: "
              f"**{_fmt(geo['inter_anatomy_text_cosine_mean'])}** (std {_fmt(geo['inter_anatomy_text_cosine_std'])}, "
              f"{geo['n_pairs']} pairs). Plots: `text_similarity_hist.png`, `tsne_anatomy.png`."]
    if "inter_anatomy_image_cosine_mean" in geo:
        lines.append(f"Image embeddings of different anatomies: mean cosine "
                     f"{_fmt(geo['inter_anatomy_image_cosine_mean'])} over all pairs, "
                     f"{_fmt(geo['same_scan_image_cosine_mean'])} within one scan.")
    lines.append("")
    return "\n".join(lines)


def evaluate(
    checkpoint: str | Path,
    data: str | Path,
    *,
    split: str = "valid",
    out: str | Path = "eval_out",
    device: str = "cpu",
    segmentation: str = "auto",
    seed: int = 0,
    operating_split: str | None = None,
    write_operating_points: bool = False,
    localisation_data: str | Path | None = None,
    localisation_limit: int | None = None,
    progress: ProgressCallback | None = None,
) -> EvaluationResult:
    """Evaluate a checkpoint zero-shot on a cache or a CT-RATE-layout dataset; write the reports.

    Args:
        checkpoint: checkpoint directory (or its config.json / model.safetensors).
        data: cache folder (has ``cache.json``) or dataset root (prepared into ``out/cache``).
        split: split to evaluate.
        out: output folder.
        device: torch device.
        segmentation: how to get organ labels when ``data`` is a dataset root (see ``training.prepare``).
        seed: t-SNE / pair sampling seed.
        operating_split: another split of the same data on which to choose the operating points
            (per-finding thresholds); the reported split is then also scored at them. Without it,
            operating points stored in the checkpoint are used, if any.
        write_operating_points: store the points chosen on ``operating_split`` in the checkpoint.
        localisation_data: a phantom dataset root with ``lesions/`` maps: add the heatmaps'
            localisation metrics (:mod:`training.localisation`) of its ``split``.
        localisation_limit: only the first N volumes of it.
        progress: ``progress(done, total, message)``.
    """
    import torch

    from napari_ctvlp.engine.checkpoint import load_checkpoint
    from napari_ctvlp.engine.preprocess import PreprocessConfig
    from training.prepare import prepare_cache

    if operating_split is not None and operating_split == split:
        raise ValueError(f"operating points must be chosen on a split other than the one reported ({split!r})")
    if write_operating_points and operating_split is None:
        raise ValueError("--write-operating-points needs --operating-split")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_checkpoint(checkpoint, device=device)
    model = loaded.model.eval()
    data = Path(data)
    if (data / "cache.json").is_file():
        cache = data
        cache_pre = json.loads((data / "cache.json").read_text())["preprocess"]
        if cache_pre != loaded.preprocessing:
            logger.warning("--data %s was prepared with %s, the checkpoint expects %s", data, cache_pre, loaded.preprocessing)
    elif data.is_dir():
        cache = out / "cache"
        result = prepare_cache(data, cache, preprocess_config=PreprocessConfig.from_dict(loaded.preprocessing),
                               split=split, segmentation=segmentation, anatomies=tuple(model.config.anatomies))
        if result.n_failed:
            logger.warning("%d volumes could not be prepared: %s", result.n_failed, "; ".join(result.failures[:5]))
    else:
        raise ValueError(f"--data {data} is neither a cache folder nor a dataset folder")

    if operating_split is not None and not (cache / operating_split / "manifest.json").is_file() and data.is_dir() \
            and not (data / "cache.json").is_file():
        prepare_cache(data, cache, preprocess_config=PreprocessConfig.from_dict(loaded.preprocessing),
                      split=operating_split, segmentation=segmentation, anatomies=tuple(model.config.anatomies))
    with torch.inference_mode():
        enc = _encode_cache(model, cache, split, device=device, progress=progress)
        calib = _encode_cache(model, cache, operating_split, device=device, progress=progress) \
            if operating_split is not None else None
    names, labels = enc["names"], enc["labels"]
    ensemble = metrics_table(labels, enc["probs"], names)
    operating: dict[str, Any] | None = None
    if calib is not None:
        thresholds = choose_operating_points(calib["labels"], calib["probs"], names)
        operating = {"thresholds": thresholds, "chosen_on": {"data": str(data), "split": operating_split,
                                                             "n_volumes": int(len(calib["labels"]))}}
        if write_operating_points:
            store_operating_points(loaded.path, thresholds, chosen_on=operating["chosen_on"])
    elif isinstance(loaded.meta.get("operating_points"), dict):
        stored = loaded.meta["operating_points"]
        operating = {"thresholds": {k: (float("nan") if v is None else float(v))
                                    for k, v in stored.get("thresholds", {}).items()},
                     "chosen_on": stored.get("chosen_on")}
    at_operating = metrics_table(labels, enc["probs"], names, thresholds=operating["thresholds"]) \
        if operating is not None else None
    per_template = []
    for p, (pos, neg) in enumerate(PROMPT_TEMPLATES):
        table = metrics_table(labels, enc["per_template"][:, :, p], names)
        per_template.append({"positive": pos, "negative": neg, "mean": table["mean"],
                             "auc": {n: table["per_abnormality"][n]["auc"] for n in names}})
    over = {k: {"mean": float(np.nanmean([t["mean"][k] for t in per_template])),
                "std": float(np.nanstd([t["mean"][k] for t in per_template]))} for k in METRIC_KEYS}
    owner = enc["owner"][:, 1] if len(enc["owner"]) else np.zeros(0, int)
    sims = inter_anatomy_similarities(enc["text_emb"], owner, seed=seed)
    image_sims = inter_anatomy_similarities(enc["image_emb"], owner, seed=seed)
    scan_sims = same_scan_similarities(enc["image_emb"], enc["owner"])
    metrics = {
        "checkpoint": str(loaded.path), "data": str(data), "split": split, "n_volumes": int(len(labels)),
        "supervision": supervision_of(loaded.meta),
        "abnormalities": list(names),
        "anatomy_of": {n: ABNORMALITY_BY_NAME[n].anatomy for n in names},
        "templates": [list(t) for t in PROMPT_TEMPLATES],
        "ensemble": ensemble, "per_template": per_template, "over_templates": over,
        "operating_points": operating, "at_operating_points": at_operating,
        "geometry": {"inter_anatomy_text_cosine_mean": float(np.mean(sims)) if len(sims) else float("nan"),
                     "inter_anatomy_text_cosine_std": float(np.std(sims)) if len(sims) else float("nan"),
                     "n_pairs": int(len(sims)), "temperature": float(model.temperature()),
                     "inter_anatomy_image_cosine_mean": float(np.mean(image_sims)) if len(image_sims) else float("nan"),
                     "same_scan_image_cosine_mean": float(np.mean(scan_sims)) if len(scan_sims) else float("nan")},
    }
    if enc["embedding"] is not None:  # the CA-GCL anatomy-embedding scores of a prompt evidence model
        emb_over = [metrics_table(labels, enc["embedding"][:, :, p], names)["mean"]["auc"]
                    for p in range(len(PROMPT_TEMPLATES))]
        metrics["embedding_zero_shot"] = {
            "ensemble": metrics_table(labels, enc["embedding"].mean(-1), names),
            "template_auc_mean": float(np.nanmean(emb_over)), "template_auc_std": float(np.nanstd(emb_over))}
        metrics["scoring"] = "prompt evidence head (sentence contrast over cells, report text only)"
    else:
        metrics["scoring"] = "anatomy embedding cosine (CA-GCL)"
    if enc["evidence"] is not None:  # the supervised recognition head (report-text tags), not zero-shot
        metrics["evidence_recognition"] = metrics_table(labels, enc["evidence"], names)
    if localisation_data is not None:
        from training.localisation import evaluate_localisation

        metrics["localisation"] = evaluate_localisation(loaded.path, localisation_data, split=split,
                                                        limit=localisation_limit, device=device).metrics
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    (out / "metrics.md").write_text(markdown_report(metrics))
    rows = ["volume," + ",".join(f'"{n}"' for n in names) + "," + ",".join(f'"label {n}"' for n in names)]
    for v, p, y in zip(enc["volumes"], enc["probs"], labels):
        rows.append(v + "," + ",".join(f"{x:.5f}" for x in p) + "," + ",".join(str(int(x)) for x in y))
    (out / "scores.csv").write_text("\n".join(rows) + "\n")
    write_plots(out, sims, enc, seed=seed)
    return EvaluationResult(out, ensemble["mean"]["auc"], over["auc"]["mean"], over["auc"]["std"],
                            metrics["geometry"]["inter_anatomy_text_cosine_mean"], metrics)


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of ``python -m training.evaluate``."""
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint directory")
    p.add_argument("--data", required=True, help="prepared cache, or a dataset in the CT-RATE layout")
    p.add_argument("--split", default="valid", help="split (default: valid)")
    p.add_argument("--out", default="eval_out", help="output folder (default: eval_out)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--segmentation", default="auto", help="organ labels for a dataset root (see training.prepare)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--operating-split", default=None,
                   help="choose per-finding operating points on this other split (e.g. train) and report at them")
    p.add_argument("--localisation", default=None, metavar="ROOT",
                   help="phantom dataset root with lesions/ maps: add pointing game, voxel AUROC and cross-finding "
                        "correlation of the heatmaps (same --split)")
    p.add_argument("--localisation-limit", type=int, default=None, help="only the first N volumes for --localisation")
    p.add_argument("--write-operating-points", action="store_true",
                   help="store the operating points chosen on --operating-split in the checkpoint's config.json")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m training.evaluate``."""
    from tqdm import tqdm

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    bar = tqdm(total=0, unit="vol", desc="evaluate")

    def progress(done: int, total: int, message: str) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        result = evaluate(args.checkpoint, args.data, split=args.split, out=args.out, device=args.device,
                          segmentation=args.segmentation, seed=args.seed, operating_split=args.operating_split,
                          write_operating_points=args.write_operating_points, localisation_data=args.localisation,
                          localisation_limit=args.localisation_limit, progress=progress)
    except ValueError as exc:
        bar.close()
        logger.error("%s", exc)
        return 2
    bar.close()
    print(f"mean AUC {result.mean_auc:.4f} | over templates {result.template_auc_mean:.4f} +- "
          f"{result.template_auc_std:.4f} | inter-anatomy text cosine {result.inter_anatomy_text_cosine:.4f} "
          f"-> {result.out_dir}")
    emb = result.metrics.get("embedding_zero_shot")
    if emb:
        print(f"scored by the prompt evidence head; CA-GCL anatomy-embedding scores: mean AUC "
              f"{emb['ensemble']['mean']['auc']:.4f} | over templates {emb['template_auc_mean']:.4f} +- "
              f"{emb['template_auc_std']:.4f}")
    rec = result.metrics.get("evidence_recognition")
    if rec:
        print(f"evidence head recognition (report-text tags, not zero-shot): mean AUC {rec['mean']['auc']:.4f}")
    loc = result.metrics.get("localisation")
    if loc:
        print("localisation: " + "; ".join(
            f"{k} pointing {loc['pointing'][k]:.3f} voxel AUROC {loc['voxel_auroc'][k]:.3f}"
            + (f" cross-finding r {loc['cross_finding_correlation'][k]:.3f}" if k in loc["cross_finding_correlation"] else "")
            for k in loc["pointing"])
            + f" ({loc['n_pairs']} pairs)")
    sup = result.metrics["supervision"]
    print(f"labels seen in training: label file {sup.get('label_file_used')}; tag targets {sup.get('tag_targets')}; "
          f"finding tags from report text: {len(sup.get('finding_tags_from_report_text') or [])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
