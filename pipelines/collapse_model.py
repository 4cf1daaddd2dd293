"""The two-field model of docs/design.md ("Dimension collapse"), in numpy: watch a low-cardinality field collapse the other.

A toy trainer for pipelines/collapse_demo.py and its tests, not part of the dstab library.

Field A has ``n_a`` values (users, say), field B ``n_b`` (gender: 2). The score
of a pair is ``s(i, j) = <v_i, v_j>``, trained with binary cross-entropy and an
L2 penalty ``λ/2 (||V_A||² + ||V_B||²)`` on labels drawn from a ground-truth
model of the same form. The gradients (docs/design.md, "Dimension collapse")::

    ∂L/∂V_A = (σ(V_A V_B^T) - Y) ⊙ M V_B / |D| + λ V_A,   ∂L/∂V_B = ((σ - Y) ⊙ M)^T V_A / |D| + λ V_B

where ``M`` counts how often each pair is in the dataset ``D``. At a stationary
point with ``λ > 0``, ``λ V_A = -G V_B``: the rows of ``V_A`` lie in the row
space of ``V_B``, so ``rank(V_A) <= n_b``. With ``λ = 0`` the gradient only ever
moves ``V_A`` inside that row space, and the component the initialisation put
outside it stays: full rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dstab.spectrum import effective_rank
from dstab.store import Staging, Version, open_version


@dataclass
class Dataset:
    """Pairs observed ``counts[i, j]`` times with mean label ``labels[i, j]`` (dense: the model is small)."""

    labels: np.ndarray  # n_a x n_b, in [0, 1]
    counts: np.ndarray  # n_a x n_b, observations of each pair


def make_dataset(
    n_a: int, n_b: int, *, d_true: int = 4, observations: int = 4, density: float = 1.0, seed: int = 0
) -> Dataset:
    """Labels drawn from a ground-truth model ``σ(U_A U_B^T)``, each kept pair observed ``observations`` times."""
    rng = np.random.default_rng([seed, 0])
    u_a = rng.normal(size=(n_a, d_true))
    u_b = rng.normal(size=(n_b, d_true))
    p = 1.0 / (1.0 + np.exp(-(u_a @ u_b.T)))
    counts = np.where(rng.random((n_a, n_b)) < density, observations, 0).astype(np.float64)
    draws = rng.binomial(counts.astype(np.int64), p)
    labels = np.divide(draws, counts, out=np.zeros_like(p), where=counts > 0)
    return Dataset(labels=labels, counts=counts)


@dataclass
class Snapshot:
    step: int
    loss: float
    singular_values_a: list[float]
    numerical_rank_a: int
    effective_rank_a: float


@dataclass
class TwoFieldModel:
    v_a: np.ndarray  # n_a x d
    v_b: np.ndarray  # n_b x d
    lam: float
    history: list[Snapshot] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)

    def write_version(self, out: str | os.PathLike[str], *, overwrite: bool = False) -> Version:
        """Field A as users, field B as items, in the standard layout (scores ``<user, item>``)."""
        staging = Staging(os.fspath(out), inputs=[], overwrite=overwrite)
        try:
            for side, table in (("users", self.v_a), ("items", self.v_b)):
                data = table.astype(np.float32)
                target = staging.create_array(f"{side}/vectors", shape=data.shape, chunks=data.shape, dtype=data.dtype)
                target.open()[...] = data
                ids = staging.create_array(
                    f"{side}/ids", shape=(len(data),), chunks=(len(data),), dtype=np.dtype(np.int64)
                )
                ids.open()[...] = np.arange(len(data), dtype=np.int64)
            staging.publish({"kind": "two-field-model", "params": self.params})
        except BaseException:
            staging.discard()
            raise
        return open_version(out)


def _sigmoid(s: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * s))  # no overflow warnings for large |s|


def _loss(data: Dataset, s: np.ndarray, v_a: np.ndarray, v_b: np.ndarray, lam: float) -> float:
    n = data.counts.sum()
    # BCE with logits, stable: log(1 + e^s) - y s
    bce = (np.logaddexp(0.0, s) - data.labels * s) * data.counts
    return float(bce.sum() / n + 0.5 * lam * ((v_a**2).sum() + (v_b**2).sum()))


def train(
    data: Dataset,
    *,
    d: int = 16,
    lam: float = 1e-2,
    steps: int = 2000,
    lr: float = 10.0,
    batch: int | None = None,
    init_scale: float = 0.1,
    seed: int = 0,
    record_every: int = 0,
    rtol: float = 1e-6,
) -> TwoFieldModel:
    """Gradient descent on the loss above: full batch, or mini-batches of ``batch`` observed pairs (SGD).

    ``record_every`` > 0 keeps the spectrum of ``V_A`` every that many steps.
    """
    n_a, n_b = data.labels.shape
    rng = np.random.default_rng([seed, 1])
    v_a = init_scale * rng.normal(size=(n_a, d))
    v_b = init_scale * rng.normal(size=(n_b, d))
    n_obs = data.counts.sum()
    pairs = np.argwhere(data.counts > 0)
    weights = data.counts[data.counts > 0] / n_obs
    model = TwoFieldModel(v_a, v_b, lam, params={"n_a": n_a, "n_b": n_b, "d": d, "lam": lam, "steps": steps,
                                                  "lr": lr, "batch": batch, "seed": seed})  # fmt: skip

    def record(step: int) -> None:
        sv = np.linalg.svd(v_a, compute_uv=False)
        model.history.append(
            Snapshot(
                step=step,
                loss=_loss(data, v_a @ v_b.T, v_a, v_b, lam),
                singular_values_a=sv.tolist(),
                numerical_rank_a=int(np.count_nonzero(sv > rtol * sv[0])) if sv[0] > 0 else 0,
                effective_rank_a=effective_rank(sv),
            )
        )

    for step in range(steps):
        if record_every and step % record_every == 0:
            record(step)
        if batch is None:
            g = (_sigmoid(v_a @ v_b.T) - data.labels) * data.counts / n_obs
        else:
            picked = pairs[rng.choice(len(pairs), size=batch, p=weights)]
            i, j = picked[:, 0], picked[:, 1]
            residual = _sigmoid((v_a[i] * v_b[j]).sum(axis=1)) - data.labels[i, j]
            g = np.zeros((n_a, n_b))
            np.add.at(g, (i, j), residual / batch)
        grad_a = g @ v_b + lam * v_a
        grad_b = g.T @ v_a + lam * v_b
        v_a = v_a - lr * grad_a
        v_b = v_b - lr * grad_b
    model.v_a, model.v_b = v_a, v_b
    if record_every:
        record(steps)
    return model
