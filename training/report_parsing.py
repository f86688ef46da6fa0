"""Rule-based split of a chest-CT report into anatomy-wise sentence lists (CA-GCL text side).

A report is split into sentences, and each sentence goes to every anatomy of
:data:`napari_ctvlp.engine.anatomy.ANATOMY_NAMES` whose lexicon (regular expressions, matched
case-insensitively anywhere in the sentence) it matches, unless a veto of that anatomy
(:data:`DEFAULT_VETOES`) matches too: coronary plaques are not aortic, a pacemaker lead in the
right ventricle is medical material (``body``) and not a heart finding, an inguinal hernia is not a
hiatal hernia, axillary nodes are not mediastinal. ``body`` is the rest of the scanned body
(devices, bones, soft tissue, the upper abdomen); a sentence matching no anatomy ("No significant
abnormality.") is dropped, not given to ``body``, the anatomy that scores Medical material. Negated sentences ("No pleural effusion.") are kept: they are what teaches the model
the normal appearance. Findings and impression are parsed jointly: impression sentences are
appended after the findings of the anatomies they mention.

An optional LLM backend (:func:`parse_report_llm`) sends the report to an OpenAI-compatible
chat endpoint that you configure explicitly; it is never used by default.
"""

from __future__ import annotations

import json
import logging
import os
import re
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from napari_ctvlp.engine.anatomy import ANATOMY_NAMES

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_KEEPS",
    "DEFAULT_LEXICON",
    "DEFAULT_VETOES",
    "AnatomyReport",
    "parse_report",
    "parse_report_llm",
    "split_findings_impression",
    "split_sentences",
]

_EXTRATHORACIC = r"(liver|hepat|thyroid|kidney|renal|adrenal|splen|pancrea|breast)"

#: Anatomy -> regular expressions (lower-case text, ``re.search``). A sentence may match several.
DEFAULT_LEXICON: Mapping[str, tuple[str, ...]] = {
    "lung": (
        r"\blungs?\b", rf"^(?!.*{_EXTRATHORACIC}).*(\blobes?\b|nodul)", r"\blobar", r"pleur",
        r"(?<!main )bronch",
        r"(?<!aorto)(?<!aorta)pulmon", r"emphysem", r"bull(a|ae|ous)\b", r"\bblebs?\b", r"atelecta",
        r"consolidat", r"ground[ -]?glass", r"septal", r"septum", r"interlobular", r"mosaic",
        r"fibro", r"sequela", r"pneumon", r"infiltrat", r"opacit", r"interstiti",
        r"alveol", r"fissur", r"apex|apices|apical", r"subpleural", r"^(?!.*pericard).*effusion",
        r"reticul", r"honeycomb", r"cavit", r"air[ -]?trapping", r"tree[ -]in[ -]bud", r"\bscar",
        r"\bbands?\b", r"micronod", r"centriacinar|centrilobular|paraseptal", r"lingula", r"aeration",
        r"[a-z]thora(x|ces)\b",
    ),
    "heart": (
        r"\bheart", r"cardi(?!a\b)", r"pericard", r"coronar", r"\batri(um|al)\b", r"ventric",
        r"valv", r"mitral", r"myocard", r"\bcabg\b", r"bypass",
        r"\blad\b", r"\brca\b", r"circumflex", r"\bctr\b",
    ),
    "esophagus": (
        r"(o)?esophag", r"hiat(al|us)", r"gastroesoph",
    ),
    "aorta": (
        r"aort(?!o?a?pulmonary)", r"\barch\b", r"atheroscler", r"atherom", r"arterial",
        r"calcific plaque", r"vascular calcif", r"plaques?\b", r"aneurysm", r"dissection",
    ),
    "trachea": (
        r"\btrache", r"main bronch", r"\bcarina", r"\bairways?\b",
    ),
    "mediastinum": (
        r"mediastin", r"mediasa?tin", r"pulmonary (arter|trunk)", r"(main|major) vascular", r"lymph", r"\bnodes?\b", r"\bhil(ar|um|a)\b", r"prevascular", r"paratracheal",
        r"subcarinal", r"aortopulmonary", r"\blaps?\b", r"lymphadenopath", r"adenopath", r"thym",
        r"paraesophageal", r"precarinal", r"retrocrural",
    ),
    "body": (
        r"catheter", r"\bports?\b", r"pacemaker", r"\bstents?\b", r"prosthe", r"\bclips?\b",
        r"device", r"(?<!contrast )material", r"cannula", r"\btubes?\b", r"sternotomy", r"\bwires?\b",
        r"suture", r"\bdrain", r"implant", r"electrode", r"\bgraft", r"metallic", r"surgical",
        r"operat", r"postop", r"foreign body", r"\bleads?\b", r"defibrillat",
        # the rest of the scanned body: bones, soft tissue, body wall, upper abdomen, neck
        r"\bbones?\b", r"osseous", r"vertebra", r"spin(e|al)\b", r"\bribs?\b", r"sternum", r"scapul",
        r"clavic", r"degenerat", r"osteophyt", r"fracture", r"lytic|blastic", r"soft tissue",
        r"subcutan", r"muscle", r"axilla", r"breast", r"thyroid", r"\bneck\b", r"(?<!thoraco)abdom", r"liver|hepat",
        r"gall ?bladder", r"kidney|renal", r"adrenal", r"splen|spleen", r"pancrea", r"stomach", r"bowel|colon",
        r"(?<!hiatal )(?<!hiatus )\bhernia", r"\bcysts?\b", r"chole(lith|cyst)", r"bladder", r"periton",
        r"omentum", r"nasopharyn|rosenm", r"pelvi", r"prostat", r"uter(us|ine)", r"ovar",
    ),
}

#: Anatomy -> patterns that veto a lexicon match (the sentence is about something else), unless
#: the paired "keep" pattern of :data:`DEFAULT_KEEPS` matches too.
DEFAULT_VETOES: Mapping[str, str] = {
    "lung": r"pulmonary (arter|trunk)",
    "aorta": r"coronar|\blad\b|\brca\b|circumflex",
    "heart": r"pacemaker|\bleads?\b|electrode|defibrillat|catheter|\bports?\b|cannula|\bstents?\b|\bwires?\b",
    "mediastinum": r"axilla|supraclavic|inguinal|cervical|\bneck\b|abdominal|retroperiton|mesenter|porta hepatis",
    "esophagus": r"inguinal|umbilical|incisional|ventral|abdominal wall|diaphragmatic(?! hiat)",
}
#: Anatomy -> patterns that keep a vetoed match ("plaques in the aorta and coronary arteries").
DEFAULT_KEEPS: Mapping[str, str] = {
    "lung": r"\blungs?\b|parenchym|embol|nodul|pleur|lob(e|ar)",
    "aorta": r"aort|\barch\b|supra-?aortic|arterial wall|vascular",
    "heart": r"cardiomegal|pericard|heart (size|contour)|enlarg|effusion|calcif|atherom|plaque",
    "mediastinum": r"mediastin|hil(ar|um)|paratracheal|subcarinal|prevascular|aortopulmonary|precarinal|"
                   r"paraesophageal|retrocrural|paracardiac",
    "esophagus": r"hiat|esophag|paraesophageal",
}

#: Fragments before a ";" that only introduce the next sentence ("When examined in the lung
#: parenchyma window;") are dropped when they match this and have at most 15 words.
_LEAD_IN = re.compile(r"window|as far as|evaluat|examin|sections?\b", re.I)
_ABBREVIATIONS = ("e.g", "i.e", "vs", "approx", "dr", "fig", "no", "cf", "etc", "st")
_HARD_BREAK = re.compile(r'["\u2022\u00b7\n\r]+|(?<=[.!?])\s+(?=[-*]\s)')
_SOFT_BREAK = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(])|(?<=;)\s+(?=[A-Z])")


def split_findings_impression(report_text: str) -> tuple[str, str]:
    """Split a CT-RATE ``report_text`` (findings, then the impression after the first ``"``)."""
    findings, sep, impression = report_text.partition('"')
    return findings.strip(), impression.strip()


def split_sentences(text: str) -> list[str]:
    """Split report text into sentences.

    Breaks at ``. ! ?`` followed by whitespace and an upper-case letter, digit or ``(``; at
    bullets (``•``), double quotes and line breaks; and at ``;`` followed by an upper-case word,
    dropping short lead-ins such as "When examined in the lung parenchyma window;". Decimal
    numbers ("3.3 cm") and common abbreviations ("e.g.", "approx.") do not break; enumeration
    marks ("1.") and fragments without letters are dropped.
    """
    if not isinstance(text, str):
        raise ValueError(f"split_sentences expects a string, got {type(text).__name__}")
    out: list[str] = []
    for block in _HARD_BREAK.split(text):
        pieces: list[str] = []
        start = 0
        for m in _SOFT_BREAK.finditer(block):
            before = block[start:m.start()].rstrip()
            word = re.search(r"([A-Za-z.]+)\.$", before)
            if word and word.group(1).lower().rstrip(".") in _ABBREVIATIONS:
                continue
            pieces.append(before)
            start = m.end()
        pieces.append(block[start:])
        for piece in pieces:
            s = re.sub(r"\s+", " ", piece).strip(" \t-*")
            s = re.sub(r"^\(?\d{1,2}[.)]\s*(?=[A-Za-z])", "", s)  # "1. Emphysema" -> "Emphysema"
            if not re.search(r"[A-Za-z]{2}", s):
                continue
            if s.endswith(";"):
                if _LEAD_IN.search(s) and len(s.split()) <= 15:
                    continue
                s = s[:-1].rstrip() + "."
            out.append(s)
    return out


@dataclass(frozen=True)
class AnatomyReport:
    """Anatomy-wise sentences of one report.

    Attributes:
        sentences: ``{anatomy: sentences}`` for every name of ``ANATOMY_NAMES`` (empty tuple when
            the report says nothing about it); findings first, then impression sentences.
        findings: all findings sentences, in order.
        impression: all impression sentences, in order.
    """

    sentences: dict[str, tuple[str, ...]]
    findings: tuple[str, ...] = ()
    impression: tuple[str, ...] = ()

    def text(self, anatomy: str) -> str:
        """The anatomy's sentences joined by spaces ("" when there are none)."""
        if anatomy not in self.sentences:
            raise ValueError(f"unknown anatomy {anatomy!r}; known: {', '.join(self.sentences)}")
        return " ".join(self.sentences[anatomy])

    @property
    def mentioned(self) -> tuple[str, ...]:
        """Anatomies with at least one sentence."""
        return tuple(a for a, s in self.sentences.items() if s)


def _compile(lexicon: Mapping[str, Sequence[str]]) -> dict[str, re.Pattern[str]]:
    unknown = set(lexicon) - set(ANATOMY_NAMES)
    if unknown:
        raise ValueError(f"lexicon names unknown anatomies {sorted(unknown)}; known: {', '.join(ANATOMY_NAMES)}")
    return {a: re.compile("|".join(f"(?:{p})" for p in pats), re.I) for a, pats in lexicon.items() if pats}


_DEFAULT_COMPILED = _compile(DEFAULT_LEXICON)
_VETO = {a: re.compile(p, re.I) for a, p in DEFAULT_VETOES.items()}
_KEEP = {a: re.compile(p, re.I) for a, p in DEFAULT_KEEPS.items()}


def assign_sentences(
    sentences: Sequence[str], *, lexicon: Mapping[str, Sequence[str]] = DEFAULT_LEXICON,
    unmatched: str | None = None,
) -> dict[str, list[str]]:
    """``{anatomy: [sentences]}``: each sentence to every matching anatomy (after the vetoes).

    Args:
        sentences: report sentences.
        lexicon: anatomy -> regular expressions; the vetoes apply to the default lexicon only.
        unmatched: anatomy that receives sentences matching none (default: they are dropped).
    """
    default = lexicon is DEFAULT_LEXICON
    patterns = _DEFAULT_COMPILED if default else _compile(lexicon)
    if unmatched is not None and unmatched not in ANATOMY_NAMES:
        raise ValueError(f"unmatched must be an anatomy name or None, got {unmatched!r}")
    out: dict[str, list[str]] = {a: [] for a in ANATOMY_NAMES}
    for s in sentences:
        hits = [a for a, pat in patterns.items() if pat.search(s)]
        if default:
            hits = [a for a in hits if not (a in _VETO and _VETO[a].search(s) and not _KEEP[a].search(s))]
        for a in hits or ([unmatched] if unmatched else []):
            out[a].append(s)
    return out


def parse_report(
    findings: str,
    impression: str = "",
    *,
    lexicon: Mapping[str, Sequence[str]] = DEFAULT_LEXICON,
    unmatched: str | None = None,
) -> AnatomyReport:
    """Split a report into anatomy-wise sentences with a keyword lexicon.

    Args:
        findings: the findings section (or a whole CT-RATE ``report_text``; use
            :func:`split_findings_impression` to separate its impression first).
        impression: the impression section, parsed with the findings; its sentences are
            appended to the anatomies they mention.
        lexicon: anatomy -> regular expressions; default :data:`DEFAULT_LEXICON` (with
            :data:`DEFAULT_VETOES`).
        unmatched: anatomy for sentences matching none; default None drops them.

    Returns:
        An :class:`AnatomyReport`; a sentence may appear under several anatomies, negated
        sentences are kept.
    """
    if not isinstance(findings, str) or not isinstance(impression, str):
        raise ValueError("parse_report expects findings and impression as strings")
    f_sents, i_sents = split_sentences(findings), split_sentences(impression)
    f_map = assign_sentences(f_sents, lexicon=lexicon, unmatched=unmatched)
    i_map = assign_sentences(i_sents, lexicon=lexicon, unmatched=unmatched)
    sentences = {a: tuple(f_map[a] + i_map[a]) for a in ANATOMY_NAMES}
    return AnatomyReport(sentences, tuple(f_sents), tuple(i_sents))


_LLM_PROMPT = (
    "Assign each sentence of this chest CT report to the anatomies it describes: {anatomies}. "
    "A sentence may belong to several anatomies; sentences about none belong to 'body'. Keep "
    "negated sentences. Copy sentences verbatim. Answer with JSON only: an object mapping each "
    "anatomy name to a list of sentences.\n\nFINDINGS:\n{findings}\n\nIMPRESSION:\n{impression}"
)


def parse_report_llm(
    findings: str,
    impression: str = "",
    *,
    endpoint: str | None,
    model: str,
    api_key_env: str | None = "OPENAI_API_KEY",
    timeout_s: float = 60.0,
) -> AnatomyReport:
    """Anatomy-wise split by a large language model behind an OpenAI-compatible endpoint.

    Off unless called explicitly with an ``endpoint``: the report text leaves this machine
    (logged as a warning), so use it only with a server you are allowed to send reports to.

    Args:
        findings, impression: report sections.
        endpoint: base URL of the API, e.g. ``http://localhost:8000/v1`` (``/chat/completions``
            is appended).
        model: model name the server knows.
        api_key_env: environment variable holding the API key (sent as a bearer token); None or
            an unset variable sends no key.
        timeout_s: HTTP timeout.
    """
    if not endpoint:
        raise ValueError("parse_report_llm needs an endpoint (an OpenAI-compatible base URL); none was configured")
    if not endpoint.startswith(("http://", "https://")):
        raise ValueError(f"endpoint must be an http(s) URL, got {endpoint!r}")
    if not model:
        raise ValueError("parse_report_llm needs a model name")
    url = endpoint.rstrip("/") + "/chat/completions"
    logger.warning("parse_report_llm: sending report text to %s (it leaves this machine)", url)
    prompt = _LLM_PROMPT.format(anatomies=", ".join(ANATOMY_NAMES), findings=findings, impression=impression)
    body = json.dumps({"model": model, "temperature": 0, "messages": [{"role": "user", "content": prompt}]})
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(api_key_env) if api_key_env else None
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=body.encode("utf-8"), headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 (explicit opt-in)
        reply = json.loads(response.read().decode("utf-8"))
    try:
        content = reply["choices"][0]["message"]["content"]
        content = re.sub(r"^```(?:json)?|```$", "", content.strip()).strip()
        mapping = json.loads(content)
    except (KeyError, IndexError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{url} returned no JSON anatomy mapping: {exc}") from exc
    if not isinstance(mapping, dict):
        raise ValueError(f"{url} returned {type(mapping).__name__}, expected a JSON object")
    sentences = {a: tuple(str(s).strip() for s in mapping.get(a, []) if str(s).strip()) for a in ANATOMY_NAMES}
    ignored = set(mapping) - set(ANATOMY_NAMES)
    if ignored:
        logger.warning("parse_report_llm: ignored unknown anatomies %s", sorted(ignored))
    return AnatomyReport(sentences, tuple(split_sentences(findings)), tuple(split_sentences(impression)))
