"""Rule-based report parsing: sentence splitting, anatomy assignment, LLM backend opt-in."""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from napari_ctvlp.engine.anatomy import ANATOMY_NAMES
from training.report_parsing import (
    AnatomyReport,
    parse_report,
    parse_report_llm,
    split_findings_impression,
    split_sentences,
)

REPO = Path(__file__).resolve().parents[2]


def test_split_sentences_keeps_decimals_and_abbreviations():
    text = ("Pleural effusion, 3.3 cm thick, is seen (approx. 2 cm on the left). No nodule. "
            "When examined in the lung parenchyma window; Emphysema in both lungs. "
            "1. Atelectasis\u2022 Hiatal hernia \" Coronary calcification")
    assert split_sentences(text) == [
        "Pleural effusion, 3.3 cm thick, is seen (approx. 2 cm on the left).",
        "No nodule.",
        "Emphysema in both lungs.",
        "Atelectasis",
        "Hiatal hernia",
        "Coronary calcification",
    ]
    assert split_sentences("Bilateral pleural effusion; Minimal pericardial effusion.") == [
        "Bilateral pleural effusion.", "Minimal pericardial effusion."]
    assert split_sentences("   ") == []
    with pytest.raises(ValueError, match="string"):
        split_sentences(None)  # type: ignore[arg-type]


def test_parse_report_assigns_anatomies():
    findings = ("Trachea, both main bronchi are open. Heart size is increased. "
                "Pericardial effusion was not observed. Calcified atheroma plaques in the aortic arch. "
                "There are lymph nodes in the subcarinal region. Small sliding hiatal hernia. "
                "A port catheter is seen in the superior vena cava. No pleural effusion. "
                "A 4 mm nodule in the right upper lobe. The liver is normal.")
    report = parse_report(findings, "Cardiomegaly. Pulmonary nodule.")
    assert isinstance(report, AnatomyReport) and tuple(report.sentences) == ANATOMY_NAMES
    s = report.sentences
    assert "Trachea, both main bronchi are open." in s["trachea"]
    assert "Trachea, both main bronchi are open." not in s["lung"]
    assert s["heart"] == ("Heart size is increased.", "Pericardial effusion was not observed.", "Cardiomegaly.")
    assert "Calcified atheroma plaques in the aortic arch." in s["aorta"]
    assert "There are lymph nodes in the subcarinal region." in s["mediastinum"]
    assert s["esophagus"] == ("Small sliding hiatal hernia.",)
    assert "A port catheter is seen in the superior vena cava." in s["body"]
    assert "The liver is normal." in s["body"]  # the upper abdomen is part of the scanned body
    # negations kept; impression appended after the findings of the anatomy it mentions
    assert s["lung"] == ("No pleural effusion.", "A 4 mm nodule in the right upper lobe.", "Pulmonary nodule.")
    assert report.impression == ("Cardiomegaly.", "Pulmonary nodule.")
    assert report.text("esophagus") == "Small sliding hiatal hernia."
    assert "aorta" in report.mentioned
    with pytest.raises(ValueError, match="unknown anatomy"):
        report.text("spleen")


def test_misassignments_of_the_audit_are_fixed():
    """Issue 10: coronary plaques are not aortic, pacemakers are devices not heart findings, only a
    hiatal hernia is esophageal, axillary nodes are not mediastinal, unmatched sentences are dropped."""
    s = parse_report(
        "Calcified plaques are observed in the coronary arteries. "
        "Calcified atheroma plaques in the aorta and coronary arteries. "
        "A pacemaker lead is seen in the right ventricle. The heart size is increased. "
        "Umbilical hernia is observed. Small sliding hiatal hernia. "
        "Lymph nodes of 12 mm are seen in both axillae. Subcarinal lymph node of 15 mm. "
        "No significant abnormality was detected.").sentences
    assert s["aorta"] == ("Calcified atheroma plaques in the aorta and coronary arteries.",)
    assert "Calcified plaques are observed in the coronary arteries." in s["heart"]
    assert "A pacemaker lead is seen in the right ventricle." in s["body"]
    assert "A pacemaker lead is seen in the right ventricle." not in s["heart"]
    assert s["esophagus"] == ("Small sliding hiatal hernia.",)
    assert "Umbilical hernia is observed." in s["body"]
    assert s["mediastinum"] == ("Subcarinal lymph node of 15 mm.",)
    assert "Lymph nodes of 12 mm are seen in both axillae." in s["body"]
    assert not any("No significant abnormality" in x for v in s.values() for x in v)


def test_custom_lexicon_and_ct_rate_split():
    report = parse_report("Heart normal. Lungs clear.", lexicon={"heart": (r"heart",)}, unmatched="body")
    assert report.sentences["heart"] == ("Heart normal.",)
    assert report.sentences["body"] == ("Lungs clear.",) and report.sentences["lung"] == ()
    assert parse_report("Heart normal. Lungs clear.", lexicon={"heart": (r"heart",)}).sentences["body"] == ()
    with pytest.raises(ValueError, match="unknown anatomies"):
        parse_report("x", lexicon={"spleen": ("splen",)})
    assert split_findings_impression('Findings here. " Impression one." Impression two.') == (
        "Findings here.", 'Impression one." Impression two.')


def test_llm_backend_is_off_by_default(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("parse_report must not open any URL")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    assert parse_report("No pleural effusion.").sentences["lung"] == ("No pleural effusion.",)
    with pytest.raises(ValueError, match="endpoint"):
        parse_report_llm("No pleural effusion.", endpoint=None, model="m")
    with pytest.raises(ValueError, match="endpoint"):
        parse_report_llm("No pleural effusion.", endpoint="", model="m")
    with pytest.raises(ValueError, match="http"):
        parse_report_llm("No pleural effusion.", endpoint="file:///etc/passwd", model="m")


def test_llm_backend_against_a_local_fake_server(caplog, monkeypatch):
    """The client speaks the OpenAI chat format (a loopback server, no outside network)."""
    seen = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            seen["path"] = self.path
            seen["auth"] = self.headers.get("Authorization")
            seen["body"] = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            content = "```json\n" + json.dumps({"lung": ["No pleural effusion."], "spleen": ["x"]}) + "\n```"
            payload = json.dumps({"choices": [{"message": {"content": content}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("CTVLP_TEST_KEY", "secret")
    try:
        with caplog.at_level(logging.WARNING, logger="training.report_parsing"):
            report = parse_report_llm("No pleural effusion.", endpoint=f"http://127.0.0.1:{server.server_port}/v1",
                                      model="tiny", api_key_env="CTVLP_TEST_KEY", timeout_s=10)
    finally:
        server.shutdown()
        server.server_close()
    assert seen["path"] == "/v1/chat/completions" and seen["auth"] == "Bearer secret"
    assert seen["body"]["model"] == "tiny" and "No pleural effusion." in seen["body"]["messages"][0]["content"]
    assert report.sentences["lung"] == ("No pleural effusion.",) and report.sentences["heart"] == ()
    assert "leaves this machine" in caplog.text


def _load_benchmark():
    path = REPO / "benchmarks" / "report_parsing_recall.py"
    spec = importlib.util.spec_from_file_location("report_parsing_recall", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.realdata
def test_recall_on_real_ct_rate_reports(realdata):
    csv_path = realdata / "reports" / "ct_rate_reports_800.csv"
    if not csv_path.is_file():
        pytest.skip(f"{csv_path} is absent")
    results = _load_benchmark().measure(csv_path)
    assert len(results) == 18 and all(r.positives > 0 for r in results)
    recalls = [r.recall for r in results]
    assert sum(recalls) / len(recalls) >= 0.9
    assert min(recalls) >= 0.9, {r.name: round(r.recall, 3) for r in results}
