"""Embedding geometry of a zero-shot evaluation: similarities between anatomies, and the plots.

CA-GCL's claim is about the text side: anatomy texts of different organs should not collapse onto
one direction (mean inter-anatomy cosine low, histogram a bell, not a spike). The image side is
reported beside it: the mean cosine between image embeddings of different anatomies, over all
pairs and within one scan (a high within-scan figure means every organ of a patient carries the
same patient-wide component, which the global group contrast can match with a shared text
component).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["inter_anatomy_similarities", "same_scan_similarities", "write_plots"]


def _pair_cosines(emb: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Cosine similarity of every pair of rows ``i < j`` of ``emb``, and the pairs' indices."""
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12)
    iu = np.triu_indices(len(e), k=1)
    return (e @ e.T)[iu], iu


def inter_anatomy_similarities(text_emb: np.ndarray, anatomy_of: np.ndarray, *, max_pairs: int = 200_000,
                               seed: int = 0) -> np.ndarray:
    """Cosine similarities of text embeddings belonging to *different* anatomies (all pairs, or a sample)."""
    if len(text_emb) < 2:
        return np.zeros(0)
    sim, iu = _pair_cosines(text_emb)
    vals = sim[anatomy_of[iu[0]] != anatomy_of[iu[1]]]
    if len(vals) > max_pairs:
        vals = np.random.default_rng(seed).choice(vals, max_pairs, replace=False)
    return vals


def same_scan_similarities(emb: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """Cosine similarities of embeddings of *different* anatomies of the *same* scan; ``owner`` is
    ``[N, 2]`` (scan index, anatomy index) per row of ``emb``."""
    if len(emb) < 2:
        return np.zeros(0)
    sim, iu = _pair_cosines(emb)
    a, b = owner[iu[0]], owner[iu[1]]
    return sim[(a[:, 0] == b[:, 0]) & (a[:, 1] != b[:, 1])]


def write_plots(out: Path, sims: np.ndarray, data: dict[str, Any], *, seed: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(sims, bins=50, range=(-1, 1), color="tab:blue")
    ax.set_xlabel("cosine similarity of text embeddings of different anatomies")
    ax.set_ylabel("pairs")
    ax.set_title(f"mean {np.mean(sims):.3f}" if len(sims) else "no pairs")
    fig.tight_layout()
    fig.savefig(out / "text_similarity_hist.png", dpi=100)
    plt.close(fig)

    from sklearn.manifold import TSNE

    anatomies = data["anatomies"]
    owner = data["owner"][:, 1] if len(data["owner"]) else np.zeros(0, int)
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, key, title in ((axes[0], "image_emb", "image anatomy embeddings"), (axes[1], "text_emb", "text anatomy embeddings")):
        emb = data[key]
        if len(emb) >= 5:
            perplexity = float(min(30.0, max(2.0, (len(emb) - 1) / 3.0)))
            xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(emb)
            for j, name in enumerate(anatomies):
                sel = owner == j
                if sel.any():
                    ax.scatter(xy[sel, 0], xy[sel, 1], s=8, label=name)
            ax.legend(fontsize=7, markerscale=2)
        ax.set_title(f"t-SNE: {title}")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out / "tsne_anatomy.png", dpi=100)
    plt.close(fig)
