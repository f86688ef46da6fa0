"""MOSMOS tag targets from the report text: which tags a report affirms (never a label file).

MOSMOS supervises its tag decoder with the tags *found in the report*. For a finding term (e.g.
"pleural effusion") a report affirms the tag when one of its sentences names the finding (the
term, a synonym or a lexicon pattern of :data:`FINDING_PATTERNS`) and that mention is not negated
(a NegEx-style rule: a negation cue before the mention in the same clause, e.g. "No pleural
effusion", "without ...", or after it, e.g. "... was not observed"). An anatomy phrase is affirmed
when the report says something about that anatomy; any other tag when it occurs in the text and is
not negated.

The CT-RATE label CSV is never read here: the labels are what evaluation scores, so training on
them would make "zero-shot" supervised. ``benchmarks/report_tag_agreement.py`` measures how well
these text-derived tags agree with the labels on real CT-RATE reports.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import lru_cache

import numpy as np

from napari_ctvlp.engine.anatomy import ABNORMALITIES, ANATOMY_BY_NAME

__all__ = ["FINDING_PATTERNS", "affirmed", "affirms_finding", "finding_mentions", "report_tag_targets", "split_clauses"]

#: Finding term (lower case) -> regular expressions naming it in a sentence (lower-cased text).
FINDING_PATTERNS: Mapping[str, tuple[str, ...]] = {
    "medical material": (r"catheter", r"pacemaker", r"\bstents?\b", r"prosthe", r"\bport\b", r"\bclips?\b",
                         r"cannula", r"(?<!endotracheal )\btubes?\b|endotracheal tube", r"sternotomy",
                         r"\bwires?\b", r"suture", r"electrode", r"implant", r"foreign body", r"metallic",
                         r"medical (material|device)", r"\bicd\b|defibrillator"),
    "arterial wall calcification": (r"atheroscler\w*", r"atherom\w*", r"(aort\w*|arterial|vascular)\b.{0,40}calcif",
                                    r"calcif\w*.{0,30}(aort|arter|vascular|plaque)", r"arterial wall calcification"),
    "cardiomegaly": (r"cardiomegal", r"(heart|cardiac)( size| dimensions?| contour)?.{0,30}(increas|enlarg|large)",
                     r"(enlarg|increas)\w* (in )?(the )?(heart|cardiac)"),
    "pericardial effusion": (r"pericardial (effusion|fluid)", r"fluid in the pericardi", r"pericardial effusion"),
    "coronary artery wall calcification": (
        r"coronar\w*.{0,40}(calcif|atherom|atheroscler|plaque)",
        r"(calcif|atherom|atheroscler|plaque)\w*.{0,60}(coronar|\blad\b|\brca\b|circumflex)",
        r"coronary artery wall calcification", r"coronary calcification"),
    "hiatal hernia": (r"hiat(al|us) hernia", r"hernia.{0,20}hiat"),
    "lymphadenopathy": (r"lymphadenopath", r"adenopath", r"(enlarged|pathological|pathologic) (\w+ ){0,3}(lymph )?nodes?",
                        r"lymph nodes?", r"\blaps?\b"),
    "emphysema": (r"emphysem", r"\bbullae?\b", r"bullous", r"\bblebs?\b"),
    "atelectasis": (r"atelecta",),
    "lung nodule": (r"nodul",),
    "lung opacity": (r"opacit", r"ground[ -]?glass", r"infiltrat", r"density increase", r"increased density"),
    "pulmonary fibrotic sequela": (r"fibro(tic|sis|us)", r"sequela", r"\bscar", r"fibroatelecta", r"\bbands?\b"),
    "pleural effusion": (r"pleural effusion", r"(?<!pericardial )effusion", r"fluid in the pleural", r"pleural fluid"),
    "mosaic attenuation pattern": (r"mosaic",),
    "peribronchial thickening": (r"peribronch\w* (wall )?thicken", r"bronchial wall thicken", r"peribronchial"),
    "consolidation": (r"consolidat",),
    "bronchiectasis": (r"bronchiecta",),
    "interlobular septal thickening": (r"septal thicken", r"interlobular sept", r"septal"),
}

#: Cues that negate a finding named after them in the same clause.
_PRE_NEG = re.compile(
    r"\b(no|not|without|absence of|absent|negative for|free of|nor|neither|rather than|no evidence of|"
    r"no signs? of|ruled out)\b"
)
#: Cues that negate a finding named before them in the same clause.
_POST_NEG = re.compile(
    r"\b(not (been )?(observed|detected|seen|identified|present|noted|found|evident|visualized|monitored|"
    r"enlarged)|were not|was not|is not|are not|absent|excluded|ruled out|unremarkable|"
    r"(observed|detected|seen|identified) (no|not))\b"
)
#: Clause boundaries: the scope of a negation cue ends here.
_CLAUSE = re.compile(r"[;:]|,\s*(?:but|however|whereas|while|and)\b|\b(?:but|however|whereas|although)\b|,")


def split_clauses(sentence: str) -> list[str]:
    """A sentence (lower case) split at clause boundaries (the scope of negation cues)."""
    return [c.strip() for c in _CLAUSE.split(sentence) if c and c.strip()]


def _compiled(term: str) -> list[re.Pattern[str]]:
    pats = FINDING_PATTERNS.get(term)
    if pats is None:
        pats = (re.escape(term),)
    return [re.compile(p) for p in pats]


def affirmed(clause: str, patterns: Sequence[re.Pattern[str]]) -> bool:
    """True when ``clause`` names a finding (any pattern) and no negation cue covers the mention."""
    for pat in patterns:
        for m in pat.finditer(clause):
            before, after = clause[: m.end()], clause[m.start():]  # a cue inside the mention counts too
            if _PRE_NEG.search(before) or _POST_NEG.search(after):
                continue
            return True
    return False


def _sentence_affirms(sentence: str, patterns: Sequence[re.Pattern[str]]) -> bool:
    """True when one clause of ``sentence`` affirms one of ``patterns`` (see :func:`affirmed`)."""
    return any(affirmed(c, patterns) for c in split_clauses(sentence.lower()))


@lru_cache(maxsize=1)
def _all_finding_patterns() -> tuple[re.Pattern[str], ...]:
    return tuple(p for term in FINDING_PATTERNS for p in _compiled(term))


@lru_cache(maxsize=65536)
def affirms_finding(sentence: str) -> bool:
    """True when one clause of ``sentence`` names any of the 18 findings without negating it.

    "Consolidation is seen in the right lower lobe." is True; "No consolidation is seen." and
    "Trachea and both main bronchi are patent." are False. The clinical-aware text augmentation
    never drops such a sentence (:func:`training.text_aug.augment_sentences`, ``keep``).
    """
    return _sentence_affirms(sentence, _all_finding_patterns())


def finding_mentions(report: str, term: str) -> list[str]:
    """The sentences of ``report`` that affirm the finding ``term`` (lower-case text)."""
    from training.report_parsing import split_sentences

    pats = _compiled(term.lower())
    return [sentence for sentence in split_sentences(report) if _sentence_affirms(sentence, pats)]


def report_tag_targets(tags: Sequence[str], *, report: str, sentences: Mapping[str, Sequence[str]]) -> np.ndarray:
    """``float32 [T]``: 1 for each tag the report affirms, 0 otherwise (MOSMOS weak negatives).

    Args:
        tags: the tag vocabulary (anatomy phrases, finding terms, other words).
        report: the report text (findings + impression).
        sentences: the report's sentences per anatomy (:func:`training.report_parsing.parse_report`).
    """
    from training.report_parsing import split_sentences

    phrase_to_anatomy = {a.phrase.lower(): name for name, a in ANATOMY_BY_NAME.items()}
    clauses = [c for s in split_sentences(report) for c in split_clauses(s.lower())]
    out = np.zeros(len(tags), dtype=np.float32)
    for t, tag in enumerate(tags):
        key = tag.lower()
        if key in phrase_to_anatomy:
            out[t] = float(bool(sentences.get(phrase_to_anatomy[key])))
        else:
            pats = _compiled(key)
            out[t] = float(any(affirmed(c, pats) for c in clauses))
    return out


#: The finding terms of the 18 CT-RATE abnormalities (the tags that evaluation also scores).
FINDING_TERMS: tuple[str, ...] = tuple(a.term.lower() for a in ABNORMALITIES)
