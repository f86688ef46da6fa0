"""Free-text prompts against a scanned volume: any sentence, its negation, robustness over wordings.

A user's prompt (``"There is a nodule in the {organ}."``) is scored against every anatomy
embedding of :class:`~napari_ctvlp.engine.zero_shot.ImageFeatures`, paired with a negative
wording (given, or derived with :func:`negate`); :func:`robustness` repeats one finding over the
prompt templates and any paraphrases and says where the answer flips. Only the text encoder runs,
so a new prompt costs one cached text-encoder call.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_ctvlp.engine.anatomy import ABNORMALITY_BY_NAME, ANATOMY_BY_NAME, PROMPT_TEMPLATES
from napari_ctvlp.engine.zero_shot import ImageFeatures, _capitalize, _nanstats, _pair_probabilities

if TYPE_CHECKING:
    from napari_ctvlp.engine.networks.ctvlp import CTVLP

__all__ = ["PromptScore", "RobustnessResult", "negate", "robustness", "score_prompt"]


_NEGATIONS: tuple[tuple[str, str], ...] = (
    (r"^there (is|are) (an? |some )?(.+)$", r"There \1 no \3"),
    (r"^(.+) (is|are) (present|seen|observed|noted|visible|identified)$", r"\1 \2 not \3"),
    (r"^(.+) (shows?) (an? |some )?(.+)$", r"\1 \2 no \4"),
    (r"^findings (are|is) consistent with (an? )?(.+)$", r"There is no evidence of \3"),
    (r"^(.+) (has|have) (an? |some )?(.+)$", r"\1 \2 no \4"),
)


def negate(sentence: str) -> str:
    """A negative wording of a finding sentence ("Pleural effusion." -> "No pleural effusion.").

    Handles "There is X", "X is present/seen/observed", "The lungs show X", "Findings are
    consistent with X", "X has Y", sentences that already start with "No" (double negation is
    removed) and plain findings ("a lung nodule" -> "No lung nodule.").
    """
    s = " ".join(str(sentence).strip().split()).rstrip(".!")
    if not s:
        raise ValueError("prompt is empty")
    low = s[0].lower() + s[1:]
    m = re.match(r"^(no|there is no|there are no) (.+)$", low, flags=re.IGNORECASE)
    if m:
        return _capitalize(m.group(2)) + " is present."
    for pattern, repl in _NEGATIONS:
        if re.match(pattern, low, flags=re.IGNORECASE):
            return _capitalize(re.sub(pattern, repl, low, flags=re.IGNORECASE)) + "."
    low = re.sub(r"^(an? |the |some )", "", low, flags=re.IGNORECASE)
    return f"No {low}."


@dataclass(frozen=True)
class PromptScore:
    """A free-text prompt scored against every anatomy.

    Attributes:
        prompt: the positive sentence; ``negative``: its negative (given or derived).
        auto_negative: the negative was derived with :func:`negate`.
        anatomies: ``A`` names; ``probability``: ``[A]`` softmax over the pair (NaN if absent);
        cosine: ``[A]`` raw score of the positive sentence (its cosine with the anatomy embedding,
            or its evidence score with a prompt evidence head); ``cosine_negative``: of the negative.
        assessable: ``[A]``.
    """

    prompt: str
    negative: str
    auto_negative: bool
    anatomies: tuple[str, ...]
    probability: np.ndarray
    cosine: np.ndarray
    cosine_negative: np.ndarray
    assessable: np.ndarray

    @property
    def best_anatomy(self) -> str | None:
        """Anatomy with the highest probability (None if none is assessable)."""
        if not np.isfinite(self.probability).any():
            return None
        return self.anatomies[int(np.nanargmax(self.probability))]

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (NaN stays float NaN; serialisers turn it into null)."""
        return {
            "prompt": self.prompt, "negative": self.negative, "auto_negative": self.auto_negative,
            "anatomies": {a: {"probability": float(p), "cosine": float(c), "assessable": bool(ok)}
                          for a, p, c, ok in zip(self.anatomies, self.probability, self.cosine, self.assessable)},
        }


def _resolve_anatomies(features: ImageFeatures, anatomies: Sequence[str] | None) -> np.ndarray:
    if anatomies is None:
        return np.arange(len(features.anatomies))
    bad = [a for a in anatomies if a not in features.anatomies]
    if bad:
        raise ValueError(f"anatomies {bad} are not pooled by this model ({', '.join(features.anatomies)})")
    return np.asarray([features.anatomies.index(a) for a in anatomies])


def score_prompt(
    model: CTVLP,
    features: ImageFeatures,
    prompt: str | tuple[str, str],
    *,
    anatomies: Sequence[str] | None = None,
) -> PromptScore:
    """Score any sentence (or a (positive, negative) pair) against every anatomy.

    ``{organ}`` in the prompt is replaced by each anatomy's phrase. Only the text encoder runs
    (and only for texts not seen before).
    """
    if isinstance(prompt, str):
        positive, negative, auto = prompt.strip(), negate(prompt), True
    elif isinstance(prompt, (tuple, list)) and len(prompt) == 2 and all(isinstance(p, str) for p in prompt):
        positive, negative, auto = prompt[0].strip(), prompt[1].strip(), False
    else:
        raise ValueError(f"prompt must be a sentence or a (positive, negative) pair of sentences, got {prompt!r}")
    if not positive or not negative:
        raise ValueError("prompt sentences must not be empty")
    idx = _resolve_anatomies(features, anatomies)
    names = tuple(features.anatomies[i] for i in idx)
    phrases = [ANATOMY_BY_NAME[n].phrase if n in ANATOMY_BY_NAME else n for n in names]
    pos = [positive.replace("{organ}", ph) for ph in phrases]
    neg = [negative.replace("{organ}", ph) for ph in phrases]
    p, cp, cn = _pair_probabilities(model, features, pos, neg, idx)
    return PromptScore(positive, negative, auto, names, p, cp, cn, features.present[idx].copy())


@dataclass(frozen=True)
class RobustnessResult:
    """A finding under many wordings.

    Attributes:
        finding: the finding text; ``wordings``: the (positive, negative) pairs used
            (``{organ}`` unfilled); ``anatomies``: ``A`` names.
        probabilities: ``[W, A]``; ``mean``/``std``: ``[A]`` over wordings.
        flips_per_anatomy: ``[A]`` some wordings give p > 0.5 and others p < 0.5.
        flips: any assessable anatomy flips.
    """

    finding: str
    wordings: tuple[tuple[str, str], ...]
    anatomies: tuple[str, ...]
    probabilities: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    flips_per_anatomy: np.ndarray
    flips: bool


def robustness(
    model: CTVLP,
    features: ImageFeatures,
    finding: str,
    *,
    paraphrases: Sequence[str | tuple[str, str]] = (),
    templates: Sequence[tuple[str, str]] = PROMPT_TEMPLATES,
    anatomies: Sequence[str] | None = None,
) -> RobustnessResult:
    """Run a finding through every template plus user paraphrases; mean +- std per anatomy.

    Args:
        finding: a finding term ("pleural effusion") or a CT-RATE label name.
        paraphrases: extra sentences (negative derived with :func:`negate`) or pairs.
        templates: template pairs filled with the finding (``{x}``, ``{X}``, ``{organ}``).
        anatomies: restrict to these anatomies (default all).
    """
    finding = str(finding).strip()
    if not finding:
        raise ValueError("finding must not be empty")
    term = ABNORMALITY_BY_NAME[finding].term if finding in ABNORMALITY_BY_NAME else finding
    low = term[:1].lower() + term[1:] if not term[:2].isupper() else term
    wordings: list[tuple[str, str]] = [
        (tp.format(x=low, X=_capitalize(low), organ="{organ}"), tn.format(x=low, X=_capitalize(low), organ="{organ}"))
        for tp, tn in templates
    ]
    for para in paraphrases:
        if isinstance(para, str):
            wordings.append((para.strip(), negate(para)))
        elif isinstance(para, (tuple, list)) and len(para) == 2:
            wordings.append((str(para[0]).strip(), str(para[1]).strip()))
        else:
            raise ValueError(f"paraphrase must be a sentence or a (positive, negative) pair, got {para!r}")
    if not wordings:
        raise ValueError("no wordings: give templates and/or paraphrases")
    idx = _resolve_anatomies(features, anatomies)
    names = tuple(features.anatomies[i] for i in idx)
    pos, neg, aidx = [], [], []
    for wp, wn in wordings:
        for i, n in zip(idx, names):
            phrase = ANATOMY_BY_NAME[n].phrase if n in ANATOMY_BY_NAME else n
            pos.append(wp.replace("{organ}", phrase))
            neg.append(wn.replace("{organ}", phrase))
            aidx.append(i)
    p, _, _ = _pair_probabilities(model, features, pos, neg, np.asarray(aidx))
    probs = p.reshape(len(wordings), len(idx))
    mean, std = _nanstats(probs, axis=0)
    with np.errstate(invalid="ignore"):
        flips_a = (np.nanmax(np.where(np.isnan(probs), -np.inf, probs), axis=0) > 0.5) & (
            np.nanmin(np.where(np.isnan(probs), np.inf, probs), axis=0) < 0.5
        )
    flips_a &= features.present[idx]
    return RobustnessResult(term, tuple(wordings), names, probs, mean, std, flips_a, bool(flips_a.any()))
