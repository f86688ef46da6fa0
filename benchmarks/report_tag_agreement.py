"""Agreement of the report-derived MOSMOS tag targets with the CT-RATE labels (real reports).

Training takes MOSMOS tag targets from the report text (:mod:`training.report_tags`), never from the
label CSV. This script measures, on real CT-RATE reports with their 18 labels, how well those
text-derived targets agree with the labels: per abnormality the positives, precision, recall and
F1 of "the report affirms the finding term" against the label, then the means. It also reports
the same on synthetic phantom reports (``--phantoms N``), whose labels are exact.

Usage: ``python benchmarks/report_tag_agreement.py [--csv PATH] [--phantoms 60]``.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from napari_ctvlp.engine.anatomy import ABNORMALITIES, ABNORMALITY_NAMES  # noqa: E402
from training.report_parsing import parse_report, split_findings_impression  # noqa: E402
from training.report_tags import report_tag_targets  # noqa: E402

DEFAULT_CSV = REPO.parent / "shared" / "realdata" / "reports" / "ct_rate_reports_800.csv"
TERMS = [a.term for a in ABNORMALITIES]


def agreement(rows: list[tuple[str, list[int]]]) -> list[tuple[str, int, float, float, float]]:
    """``(name, positives, precision, recall, f1)`` per abnormality over ``(report, labels)`` rows."""
    counts = {n: [0, 0, 0] for n in ABNORMALITY_NAMES}  # tp, fp, fn
    for report, labels in rows:
        findings, impression = split_findings_impression(report)
        parsed = parse_report(findings, impression)
        pred = report_tag_targets(TERMS, report=report, sentences=parsed.sentences)
        for i, name in enumerate(ABNORMALITY_NAMES):
            y, p = labels[i] == 1, pred[i] > 0.5
            counts[name][0] += y and p
            counts[name][1] += (not y) and p
            counts[name][2] += y and not p
    out = []
    for name in ABNORMALITY_NAMES:
        tp, fp, fn = counts[name]
        prec = tp / (tp + fp) if tp + fp else float("nan")
        rec = tp / (tp + fn) if tp + fn else float("nan")
        f1 = 2 * prec * rec / (prec + rec) if tp else 0.0
        out.append((name, tp + fn, prec, rec, f1))
    return out


def _print(title: str, res: list[tuple[str, int, float, float, float]]) -> None:
    print(f"== {title}")
    print(f"{'abnormality':36s} {'n_pos':>6s} {'prec':>6s} {'recall':>6s} {'f1':>6s}")
    for name, n, p, r, f in res:
        print(f"{name:36s} {n:6d} {p:6.3f} {r:6.3f} {f:6.3f}")
    valid = [x for x in res if x[1]]
    mean = [sum(x[k] for x in valid if x[k] == x[k]) / len(valid) for k in (2, 3, 4)]
    print(f"{'mean':36s} {'':6s} {mean[0]:6.3f} {mean[1]:6.3f} {mean[2]:6.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV, help="CT-RATE style report CSV")
    parser.add_argument("--phantoms", type=int, default=60, help="phantom reports to check too (0: none)")
    args = parser.parse_args(argv)
    if args.csv.is_file():
        with args.csv.open(newline="", encoding="utf-8") as fh:
            rows = [(r["report_text"], [int(float(r[n])) for n in ABNORMALITY_NAMES]) for r in csv.DictReader(fh)]
        _print(f"CT-RATE reports ({len(rows)}) from {args.csv}", agreement(rows))
    else:
        print(f"(no report CSV at {args.csv}: real-report agreement skipped)")
    if args.phantoms:
        from napari_ctvlp.phantom import make_phantom

        rows = []
        for seed in range(900_000, 900_000 + args.phantoms):
            ph = make_phantom(seed=seed, size=(32, 48, 48), spacing=(8.0, 8.0, 8.0), noise=False)
            rows.append((ph.findings + " " + ph.impression, [ph.labels[n] for n in ABNORMALITY_NAMES]))
        _print(f"phantom reports ({len(rows)})", agreement(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
