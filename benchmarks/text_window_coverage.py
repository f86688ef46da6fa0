"""How much of the finding text reaches the text encoder at a given token limit (real CT-RATE reports).

For every report positive for an abnormality, the anatomy text the model trains on (the parser's
sentences of that anatomy, in report order, as ``training.data`` joins them) is tokenised with the
default text encoder's tokenizer. The case is *covered* at limit ``L`` when a sentence affirming the
finding (``training.report_tags``) ends within the first ``L`` tokens. Prints, per abnormality and
limit, the covered share, the median anatomy-text length, and the same for whole reports.

Usage: ``python benchmarks/text_window_coverage.py [--csv PATH] [--limits 32 64 128 256 512]``.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from napari_ctvlp.engine.anatomy import ABNORMALITY_BY_NAME, ABNORMALITY_NAMES  # noqa: E402
from training.report_parsing import parse_report, split_findings_impression  # noqa: E402
from training.report_tags import finding_mentions  # noqa: E402

DEFAULT_CSV = REPO.parent / "shared" / "realdata" / "reports" / "ct_rate_reports_800.csv"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    parser.add_argument("--limits", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    args = parser.parse_args(argv)
    if not args.csv.is_file():
        print(f"no report CSV at {args.csv}: skipped (the real reports live in ../shared/realdata)")
        return 0
    from transformers import AutoTokenizer

    from napari_ctvlp.engine.networks.text_encoder import resolve_text_encoder

    tok = AutoTokenizer.from_pretrained(resolve_text_encoder("minilm"), local_files_only=True)
    tok.model_max_length = 10**6  # count every token (no truncation warning)

    def n_tokens(text: str) -> int:
        return len(tok(text, add_special_tokens=True, truncation=False)["input_ids"])

    ends: dict[str, list[int]] = {n: [] for n in ABNORMALITY_NAMES}
    lengths: dict[str, list[int]] = {}
    report_lengths = []
    with args.csv.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            report = row["report_text"]
            findings, impression = split_findings_impression(report)
            parsed = parse_report(findings, impression)
            report_lengths.append(n_tokens(report))
            for anatomy, sents in parsed.sentences.items():
                if sents:
                    lengths.setdefault(anatomy, []).append(n_tokens(" ".join(sents)))
            for name in ABNORMALITY_NAMES:
                if int(float(row[name])) != 1:
                    continue
                sents = list(parsed.sentences[ABNORMALITY_BY_NAME[name].anatomy])
                hits = set(finding_mentions(" ".join(sents), ABNORMALITY_BY_NAME[name].term))
                end = next((n_tokens(" ".join(sents[: i + 1])) for i, s in enumerate(sents) if s in hits), None)
                ends[name].append(end if end is not None else 10**9)
    print(f"{'abnormality':36s} {'n_pos':>5s} " + " ".join(f"{'<=' + str(L):>6s}" for L in args.limits))
    for name in ABNORMALITY_NAMES:
        e = ends[name]
        print(f"{name:36s} {len(e):5d} " + " ".join(f"{sum(x <= L for x in e) / max(1, len(e)):6.2f}" for L in args.limits))
    print("median tokens per anatomy text: " + ", ".join(f"{a} {statistics.median(v):.0f}" for a, v in lengths.items()))
    print(f"median tokens per whole report: {statistics.median(report_lengths):.0f} "
          f"(90th percentile {sorted(report_lengths)[int(0.9 * len(report_lengths))]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
