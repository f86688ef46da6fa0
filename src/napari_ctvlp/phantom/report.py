"""CT-RATE style free-text reports (Findings + Impression) for synthetic phantoms.

Every present abnormality gets one located positive sentence, every absent one an explicit
negation; wordings are drawn from several phrasings and the organ paragraphs are shuffled.
:data:`REPORT_KEYWORDS` and :data:`NEGATION_CUES` let tests (and report parsers) check a report
by simple keyword matching: each sentence about a finding contains one of its keywords, and
only negated sentences contain a negation cue.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from napari_ctvlp.engine.anatomy import ABNORMALITY_NAMES

#: Lower-case keywords; every sentence about the abnormality contains at least one.
REPORT_KEYWORDS: dict[str, tuple[str, ...]] = {
    "Medical material": ("pacemaker", "port catheter", "sternotomy wire", "medical device"),
    "Arterial wall calcification": ("calcified plaques in the aort", "aortic wall calcification", "atherosclerotic calcification of the aort"),
    "Cardiomegaly": ("cardiomegaly", "heart size", "heart contour", "cardiothoracic"),
    "Pericardial effusion": ("pericardial effusion", "pericardial fluid"),
    "Coronary artery wall calcification": ("coronary",),
    "Hiatal hernia": ("hiatal hernia", "hiatus hernia"),
    "Lymphadenopathy": ("lymph node", "lymphadenopathy"),
    "Emphysema": ("emphysema",),
    "Atelectasis": ("atelectasis", "atelectatic"),
    "Lung nodule": ("nodule", "nodular"),
    "Lung opacity": ("ground-glass", "ground glass"),
    "Pulmonary fibrotic sequela": ("fibrotic",),
    "Pleural effusion": ("pleural effusion", "pleural fluid"),
    "Mosaic attenuation pattern": ("mosaic",),
    "Peribronchial thickening": ("peribronchial",),
    "Consolidation": ("consolidat",),
    "Bronchiectasis": ("bronchiectasis", "bronchiectatic"),
    "Interlobular septal thickening": ("septal",),
}
#: Lower-case cues that mark a sentence as a negation (positive sentences contain none).
NEGATION_CUES: tuple[str, ...] = ("no ", "not ", "normal", "without", "free of")

_POS: dict[str, tuple[str, ...]] = {
    "Arterial wall calcification": (
        "Calcified plaques in the aortic arch and descending aorta are observed.",
        "Atherosclerotic calcification of the aortic wall is seen.",
        "There is aortic wall calcification along the arch and the descending thoracic aorta."),
    "Cardiomegaly": (
        "The cardiothoracic ratio is increased in favour of the heart (cardiomegaly).",
        "Heart size is increased.",
        "Cardiomegaly is present."),
    "Pericardial effusion": (
        "Pericardial effusion reaching {t} mm in thickness is seen.",
        "There is pericardial fluid with a maximum thickness of {t} mm.",
        "A pericardial effusion of about {t} mm surrounds the heart."),
    "Coronary artery wall calcification": (
        "Calcified plaques are seen along the {vessels} coronary {arteries}.",
        "Coronary artery wall calcifications are noted ({vessels}).",
        "There are calcific deposits in the {vessels} coronary {arteries}."),
    "Hiatal hernia": (
        "A hiatal hernia of about {size} mm is seen at the lower end of the esophagus.",
        "Sliding-type hiatus hernia is observed at the distal esophagus.",
        "There is a hiatal hernia containing air and fluid at the esophageal hiatus."),
    "Lymphadenopathy": (
        "Enlarged lymph nodes are present in the {stations} {region}, the largest measuring {size} mm.",
        "Lymphadenopathy is observed in the {stations} {region} (largest {size} mm in short axis).",
        "Pathologically enlarged lymph nodes up to {size} mm are seen in the {stations} {region}."),
    "Emphysema": (
        "Emphysematous changes are seen in the {loc}.",
        "Centrilobular emphysema is present in the {loc}.",
        "Areas of emphysema are observed in the {loc}."),
    "Atelectasis": (
        "Subsegmental atelectasis is seen in the {loc}.",
        "Atelectatic changes are noted in the {loc}.",
        "Plate-like atelectasis is observed in the {loc}."),
    "Lung nodule": (
        "{a_nodule} measuring {size} mm {is} seen in the {loc}.",
        "{A_solid} {nodule} up to {size} mm in diameter {is} observed in the {loc}.",
        "In the {loc}, {a_nodule} of {size} mm {is} detected."),
    "Lung opacity": (
        "Ground-glass opacities are seen in the {loc}.",
        "Patchy ground-glass density increases are observed in the {loc}.",
        "There are areas of ground glass attenuation in the {loc}."),
    "Pulmonary fibrotic sequela": (
        "Fibrotic sequelae with linear parenchymal bands are seen in the {loc}.",
        "Pleuroparenchymal fibrotic strands are observed in the {loc}.",
        "Linear fibrotic changes are noted in the {loc}."),
    "Pleural effusion": (
        "Pleural effusion measuring up to {t} mm is seen {side_phrase}.",
        "There is {side_adj} pleural effusion with a maximum thickness of {t} mm.",
        "Pleural fluid reaching {t} mm is observed {side_phrase}, with compression of the adjacent lung."),
    "Mosaic attenuation pattern": (
        "A mosaic attenuation pattern is present in the {loc}.",
        "Mosaic attenuation with regional aeration differences is observed in the {loc}.",
        "There is mosaic attenuation in the {loc}."),
    "Peribronchial thickening": (
        "Peribronchial thickening is noted in the {loc}.",
        "There is peribronchial interstitial thickening in the {loc}.",
        "Peribronchial cuffing is observed in the {loc}."),
    "Consolidation": (
        "Consolidation with air bronchograms is seen in the {loc}.",
        "There is an area of consolidation in the {loc}.",
        "Consolidated lung parenchyma containing air bronchograms is observed in the {loc}."),
    "Bronchiectasis": (
        "Cylindrical bronchiectasis is seen in the {loc}.",
        "Bronchiectatic changes are observed in the {loc}, the bronchi being wider than the adjacent arteries.",
        "There is bronchiectasis in the {loc}."),
    "Interlobular septal thickening": (
        "Interlobular septal thickening is seen in the {loc}.",
        "Smooth interlobular septal thickenings are observed in the {loc}.",
        "There is a subpleural reticular pattern of septal thickening in the {loc}."),
}
_MATERIAL = {
    "pacemaker": ("A cardiac pacemaker is seen in the {side} anterior chest wall, its lead extending to the right ventricle.",
                  "Pacemaker generator in the {side} pectoral region with the lead ending in the right heart."),
    "port catheter": ("A port catheter is present in the {side} chest wall, its tip at the superior vena cava.",
                      "There is a {side}-sided port catheter extending into the superior vena cava."),
    "sternotomy wires": ("Sternotomy wires are observed along the sternum.",
                         "Median sternotomy wires are present."),
}
_NEG: dict[str, tuple[str, ...]] = {
    "Medical material": ("No medical device or foreign material is seen.", "There is no medical device in the scanned area."),
    "Arterial wall calcification": ("No aortic wall calcification is seen.", "There are no calcified plaques in the aorta."),
    "Cardiomegaly": ("Heart contour and size are normal.", "Heart size is within normal limits.", "No cardiomegaly."),
    "Pericardial effusion": ("No pericardial effusion is seen.", "There is no pericardial fluid."),
    "Coronary artery wall calcification": ("No coronary artery calcification is seen.", "Coronary arteries show no calcified plaques."),
    "Hiatal hernia": ("The thoracic esophagus has a normal calibre, with no hiatal hernia.", "No hiatal hernia is seen."),
    "Lymphadenopathy": ("No enlarged lymph nodes are seen in the mediastinum or hila.", "There is no mediastinal or hilar lymphadenopathy."),
    "Emphysema": ("No emphysema is seen.", "There are no emphysematous changes."),
    "Atelectasis": ("No atelectasis is observed.", "There is no atelectasis."),
    "Lung nodule": ("No nodule or mass is seen in either lung.", "No nodular lesion was detected in the lung parenchyma."),
    "Lung opacity": ("No ground-glass opacity is observed.", "There are no ground-glass areas in the lungs."),
    "Pulmonary fibrotic sequela": ("No fibrotic changes are seen.", "There is no fibrotic sequela in the lungs."),
    "Pleural effusion": ("No pleural effusion was detected.", "There is no pleural fluid on either side."),
    "Mosaic attenuation pattern": ("No mosaic attenuation is seen.", "There is no mosaic attenuation pattern."),
    "Peribronchial thickening": ("No peribronchial thickening is observed.", "There is no peribronchial thickening."),
    "Consolidation": ("No consolidation is seen.", "There is no consolidation in either lung."),
    "Bronchiectasis": ("No bronchiectasis is seen.", "There is no bronchiectasis."),
    "Interlobular septal thickening": ("No interlobular septal thickening is seen.", "There is no septal thickening."),
}
_IMPRESSION: dict[str, str] = {
    "Medical material": "{material}.", "Arterial wall calcification": "Atherosclerotic calcification of the aorta.",
    "Cardiomegaly": "Cardiomegaly.", "Pericardial effusion": "Pericardial effusion.",
    "Coronary artery wall calcification": "Coronary artery calcification.", "Hiatal hernia": "Hiatal hernia.",
    "Lymphadenopathy": "Mediastinal lymphadenopathy.", "Emphysema": "Emphysema in the {loc}.",
    "Atelectasis": "Atelectasis in the {loc}.", "Lung nodule": "Lung {nodule} in the {loc}.",
    "Lung opacity": "Ground-glass opacities in the {loc}.", "Pulmonary fibrotic sequela": "Fibrotic sequelae in the {loc}.",
    "Pleural effusion": "{Side_adj} pleural effusion.", "Mosaic attenuation pattern": "Mosaic attenuation pattern.",
    "Peribronchial thickening": "Peribronchial thickening.", "Consolidation": "Consolidation in the {loc}.",
    "Bronchiectasis": "Bronchiectasis in the {loc}.", "Interlobular septal thickening": "Interlobular septal thickening in the {loc}.",
}
_GROUPS = (
    ("Medical material", "Cardiomegaly", "Pericardial effusion", "Arterial wall calcification",
     "Coronary artery wall calcification", "Lymphadenopathy"),
    ("Hiatal hernia",),
    ("Emphysema", "Atelectasis", "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela",
     "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation", "Bronchiectasis",
     "Interlobular septal thickening"),
    ("Pleural effusion",),
)
#: Normal sentences opening each paragraph of :data:`_GROUPS` (alternatives), then the closing one.
_OPENERS = (
    ("Mediastinal main vascular structures are of normal width.", "The thoracic aorta has a normal diameter."),
    ("", "The thoracic esophagus is seen along its course."),
    ("Trachea and both main bronchi are patent.", "The trachea and main bronchi are in the midline and open."),
    ("", ""),
)
_CLOSING = (
    ("Upper abdominal organs included in the sections are unremarkable.", "The visualised liver and spleen are unremarkable."),
    ("Vertebral body heights are preserved.", "Bony structures in the study area are intact."),
)


def where(locs: list[tuple[str, str]]) -> str:
    """``[("right", "lower lobe"), ("left", "")]`` -> ``"right lower lobe and left lung"``."""
    sides = {s for s, _ in locs}
    if not locs:
        return "lungs"
    if all(not lobe for _, lobe in locs):
        return "both lungs" if len(sides) == 2 else f"{next(iter(sides))} lung"
    parts = []
    for s, lobe in locs:
        txt = f"{s} {lobe}" if lobe else f"{s} lung"
        if txt not in parts:
            parts.append(txt)
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _fill(name: str, template: str, det: Mapping) -> str:
    locs = det.get("locations", [])
    sizes = det.get("sizes_mm", []) or [det.get("size_mm", 10)]
    n = len(locs) or 1
    sides = sorted({s for s, _ in locs})
    vessels = det.get("vessels", ["LAD"])
    stations = det.get("stations", ["mediastinal"])
    side_adj = "bilateral" if len(sides) == 2 else (sides[0] if sides else "bilateral")
    t = det.get("thickness_mm", 10)
    values = {
        "loc": where(locs), "size": max(sizes), "t": max(t) if isinstance(t, list) and t else t,
        "vessels": " and ".join(vessels), "arteries": "arteries" if len(vessels) > 1 else "artery",
        "stations": ", ".join(stations[:-1]) + (" and " if len(stations) > 1 else "") + stations[-1],
        "region": "regions" if len(stations) > 1 else "region",
        "a_nodule": "Nodules" if n > 1 else "A nodule", "A_solid": "Solid" if n > 1 else "A solid",
        "nodule": "nodules" if n > 1 else "nodule", "is": "are" if n > 1 else "is",
        "side_phrase": "on both sides" if side_adj == "bilateral" else f"on the {side_adj}",
        "side_adj": side_adj, "Side_adj": side_adj.capitalize(),
        "side": det.get("side", "left"), "material": det.get("kind", "medical device").capitalize(),
    }
    out = template.format(**values)
    return out[:1].upper() + out[1:]


def write_report(
    labels: Mapping[str, int], details: Mapping[str, Mapping], rng: np.random.Generator
) -> tuple[str, str]:
    """Findings and impression text for one phantom.

    Args:
        labels: ``{abnormality: 0/1}`` for all 18 names.
        details: per present abnormality, the painter's details (locations, sizes, kind).
        rng: random generator choosing wordings and paragraph order.
    """
    missing = set(ABNORMALITY_NAMES) - set(labels)
    if missing:
        raise ValueError(f"labels lack {sorted(missing)}")
    paragraphs = []
    for gi, group in enumerate(_GROUPS):
        body = []
        for name in group:
            det = details.get(name, {})
            if labels[name]:
                pool = _MATERIAL[det.get("kind", "pacemaker")] if name == "Medical material" else _POS[name]
            else:
                pool = _NEG[name]
            body.append(_fill(name, pool[int(rng.integers(len(pool)))], det))
        rng.shuffle(body)
        opener = _OPENERS[gi][int(rng.integers(2))]
        paragraphs.append(" ".join(([opener] if opener else []) + body))
    paragraphs.append(" ".join(alt[int(rng.integers(2))] for alt in _CLOSING))
    order = rng.permutation(len(paragraphs))
    findings = " ".join(paragraphs[i] for i in order)
    present = [n for n in ABNORMALITY_NAMES if labels[n]]
    if present:
        impression = " ".join(_fill(n, _IMPRESSION[n], details.get(n, {})) for n in present)
    else:
        impression = ("No significant abnormality is seen in the chest.",
                      "Unremarkable chest CT.")[int(rng.integers(2))]
    return findings, impression
