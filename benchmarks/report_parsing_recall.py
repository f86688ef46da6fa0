"""Recall of the rule-based report parser on real CT-RATE reports.

For every report that is positive for an abnormality: is there a sentence naming the abnormality
(found with the per-abnormality keyword list below, which is independent of the parser's anatomy
lexicon) that the parser assigned to the abnormality's anatomy
(``ABNORMALITY_BY_NAME[name].anatomy``)? Prints, per label, the number of positives, the share
of positives whose report has such a keyword sentence at all ("mention"), and the recall (keyword
sentence present *and* assigned to the right anatomy), then the mean recall.

Usage: ``python benchmarks/report_parsing_recall.py [--csv PATH]`` (default:
``../shared/realdata/reports/ct_rate_reports_800.csv`` beside the repository).
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from napari_ctvlp.engine.anatomy import ABNORMALITY_BY_NAME, ABNORMALITY_NAMES  # noqa: E402
from training.report_parsing import parse_report, split_findings_impression  # noqa: E402

DEFAULT_CSV = REPO.parent / "shared" / "realdata" / "reports" / "ct_rate_reports_800.csv"

#: Words that name each abnormality in a report sentence (independent of the parser's lexicon).
KEYWORDS: dict[str, str] = {
    "Medical material": r"catheter|pacemaker|stent|prosthe|\bport\b|clip|device|material|cannula|tube|"
                        r"sternotomy|wire|suture|graft|electrode|implant|foreign body|metallic",
    "Arterial wall calcification": r"atheroscler|atherom|calcif\w* plaque|plaque|arterial wall calcif|"
                                   r"vascular calcif|calcific",
    "Cardiomegaly": r"cardiomegal|heart (size|dimensions?|contour)?.{0,30}(increas|enlarg|large)|"
                    r"(enlarg|increas)\w* (in )?(the )?(heart|cardiac)|cardiothoracic|\bctr\b",
    "Pericardial effusion": r"pericard",
    "Coronary artery wall calcification": r"coronar|\blad\b|\brca\b|circumflex",
    "Hiatal hernia": r"hiat|hernia",
    "Lymphadenopathy": r"lymph|\blaps?\b|\bnodes?\b|adenopath",
    "Emphysema": r"emphysem|bulla|bullous|\bblebs?\b",
    "Atelectasis": r"atelecta",
    "Lung nodule": r"nodul",
    "Lung opacity": r"opacit|ground[ -]?glass|infiltrat|consolidat|densit",
    "Pulmonary fibrotic sequela": r"fibro|sequela|scar|\bbands?\b",
    "Pleural effusion": r"(?<!pericardial )effusion",
    "Mosaic attenuation pattern": r"mosaic",
    "Peribronchial thickening": r"peribronch|bronchial wall|bronchial thicken",
    "Consolidation": r"consolid",
    "Bronchiectasis": r"bronchiecta",
    "Interlobular septal thickening": r"septal|septum|interlobular",
}


@dataclass(frozen=True)
class LabelRecall:
    """Figures of one abnormality."""

    name: str
    positives: int
    mentioned: int
    assigned: int

    @property
    def recall(self) -> float:
        return self.assigned / self.positives if self.positives else float("nan")

    @property
    def mention_rate(self) -> float:
        return self.mentioned / self.positives if self.positives else float("nan")


def measure(csv_path: Path) -> list[LabelRecall]:
    """Recall of :func:`training.report_parsing.parse_report` per abnormality on a CT-RATE CSV."""
    if not csv_path.is_file():
        raise ValueError(f"report CSV {csv_path} does not exist")
    patterns = {n: re.compile(k, re.I) for n, k in KEYWORDS.items()}
    counts = {n: [0, 0, 0] for n in ABNORMALITY_NAMES}
    with csv_path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [n for n in ("report_text", *ABNORMALITY_NAMES) if n not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{csv_path} lacks columns {missing}")
        for row in reader:
            findings, impression = split_findings_impression(row["report_text"])
            parsed = parse_report(findings, impression)
            all_sents = parsed.findings + parsed.impression
            for name in ABNORMALITY_NAMES:
                if int(float(row[name])) != 1:
                    continue
                pat = patterns[name]
                counts[name][0] += 1
                counts[name][1] += any(pat.search(s) for s in all_sents)
                anatomy = ABNORMALITY_BY_NAME[name].anatomy
                counts[name][2] += any(pat.search(s) for s in parsed.sentences[anatomy])
    return [LabelRecall(n, *counts[n]) for n in ABNORMALITY_NAMES]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV, help="CT-RATE style report CSV")
    args = parser.parse_args(argv)
    results = measure(args.csv)
    print(f"{'abnormality':36s} {'anatomy':12s} {'n_pos':>6s} {'mention':>8s} {'recall':>7s}")
    for r in results:
        anatomy = ABNORMALITY_BY_NAME[r.name].anatomy
        print(f"{r.name:36s} {anatomy:12s} {r.positives:6d} {r.mention_rate:8.3f} {r.recall:7.3f}")
    valid = [r.recall for r in results if r.positives]
    print(f"{'mean':36s} {'':12s} {'':6s} {'':8s} {sum(valid) / len(valid):7.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
