"""Spectrum measures of dimension collapse (numpy only).

For singular values ``σ`` (descending) of a table or of the interaction core:

- ``numerical_rank``: how many exceed ``rtol * σ_max``;
- ``effective_rank``: ``exp(H(p))`` with ``p = σ / Σσ`` (Roy & Vetterli, 2007): the number of
  equally strong dimensions with the same entropy;
- ``stable_rank``: ``Σσ² / σ_max²``;
- ``information_abundance``: ``Σσ / σ_max``;
- ``collapsed``: ``effective_rank < COLLAPSE_FRACTION * dim``.

Why a fraction of the width: a healthy trained embedding spreads its energy
over most of its dimensions (a spectrum decaying like ``exp(-k / (dim / 4))``
has an effective rank near 0.7 dim), while a table collapsed by a
low-cardinality field (docs/design.md, "Dimension collapse": rank at most ``n_B``) has an effective rank of
a few dimensions whatever its width.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import linalg

COLLAPSE_FRACTION = 0.25
COLLAPSE_EXPLANATION = (
    "collapsed = effective rank below {frac:.0%} of the width: most dimensions carry almost nothing "
    "(in a two-field model trained with L2, a field with few values caps the other field's rank)"
)


def singular_values_from_gram(gram: np.ndarray) -> np.ndarray:
    """Singular values of a table from its float64 Gram ``X^T X``, descending."""
    lam = np.linalg.eigvalsh(0.5 * (gram + gram.T))
    return np.sqrt(np.clip(lam, 0.0, None))[::-1]


def score_singular_values(side_grams: list[np.ndarray]) -> np.ndarray:
    """Singular values of a model's scores from its sides' pooled Grams, descending.

    Two sides (candidate, query): those of the core ``R_C R_Q^T``. One side (a
    symmetric model): the scores ``X X^T`` have the squares of the pooled rows' singular values.
    """
    if len(side_grams) == 1:
        return singular_values_from_gram(side_grams[0]) ** 2
    candidate, query = side_grams
    return linalg.core_svd(linalg.gram_factor(candidate), linalg.gram_factor(query))[1]


def effective_rank(sv: np.ndarray) -> float:
    sv = np.asarray(sv, dtype=np.float64)
    total = sv.sum()
    if not total > 0:
        return 0.0
    p = sv[sv > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def spectrum_metrics(sv: np.ndarray, dim: int, rtol: float) -> dict[str, Any]:
    """The measures above, as a JSON-ready dict (``singular_values`` included)."""
    sv = np.sort(np.asarray(sv, dtype=np.float64))[::-1]
    top = float(sv[0]) if sv.size and sv[0] > 0 else 0.0
    eff = effective_rank(sv)
    return {
        "dim": int(dim),
        "singular_values": sv.tolist(),
        "numerical_rank": int(np.count_nonzero(sv > rtol * top)) if top > 0 else 0,
        "effective_rank": eff,
        "stable_rank": float((sv**2).sum() / top**2) if top > 0 else 0.0,
        "information_abundance": float(sv.sum() / top) if top > 0 else 0.0,
        "collapsed": bool(eff < COLLAPSE_FRACTION * dim),
        "rtol": float(rtol),
    }
