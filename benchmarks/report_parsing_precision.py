"""Precision and recall of the report parser's sentence -> anatomy assignment (hand-checked sample).

``benchmarks/data/report_sentence_anatomy_sample.json`` holds hand-checked anatomies of 100
sentences drawn at random from the 800 real CT-RATE reports (referenced by report and sentence
index; the texts stay in ``../shared/realdata``). For every anatomy this prints how many sampled
sentences the parser gave it, precision (of those, the share that really are about it) and recall.

Usage: ``python benchmarks/report_parsing_precision.py [--csv PATH]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from napari_ctvlp.engine.anatomy import ANATOMY_NAMES  # noqa: E402
from training.report_parsing import parse_report, split_findings_impression, split_sentences  # noqa: E402

SAMPLE = REPO / "benchmarks" / "data" / "report_sentence_anatomy_sample.json"
DEFAULT_CSV = REPO.parent / "shared" / "realdata" / "reports" / "ct_rate_reports_800.csv"


def measure(csv_path: Path, sample_path: Path = SAMPLE) -> dict[str, tuple[int, int, int]]:
    """``{anatomy: (true positives, assigned, truly about it)}`` over the sample."""
    sample = json.loads(sample_path.read_text())["sentences"]
    with csv_path.open(newline="", encoding="utf-8") as fh:
        reports = {r["AccessionNo"]: r["report_text"] for r in csv.DictReader(fh)}
    counts = {a: [0, 0, 0] for a in ANATOMY_NAMES}
    for item in sample:
        findings, impression = split_findings_impression(reports[item["report"]])
        sentence = (split_sentences(findings) + split_sentences(impression))[item["sentence"]]
        got = {a for a, v in parse_report(sentence).sentences.items() if v}
        gold = set(item["anatomies"])
        for a in ANATOMY_NAMES:
            counts[a][0] += a in got and a in gold
            counts[a][1] += a in got
            counts[a][2] += a in gold
    return {a: tuple(c) for a, c in counts.items()}  # type: ignore[misc]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    args = parser.parse_args(argv)
    if not args.csv.is_file():
        print(f"no report CSV at {args.csv}: skipped (the real reports live in ../shared/realdata)")
        return 0
    res = measure(args.csv)
    print(f"{'anatomy':12s} {'assigned':>8s} {'gold':>5s} {'precision':>9s} {'recall':>7s}")
    precs, recs = [], []
    for a, (tp, n_got, n_gold) in res.items():
        p = tp / n_got if n_got else float("nan")
        r = tp / n_gold if n_gold else float("nan")
        precs += [p] if n_got else []
        recs += [r] if n_gold else []
        print(f"{a:12s} {n_got:8d} {n_gold:5d} {p:9.3f} {r:7.3f}")
    print(f"{'mean':12s} {'':8s} {'':5s} {sum(precs) / len(precs):9.3f} {sum(recs) / len(recs):7.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
