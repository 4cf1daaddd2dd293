"""The two ways to find R: the float64 Gram (fast) and Householder TSQR (accurate), and `auto` between them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dstab
from dstab import linalg

from conftest import (
    random_tables,
    read_tables,
    reference_stabilize,
    relative_score_error,
    write_version,
)


def conditioned_table(seed: int, n: int, dim: int, condition: float, dtype: str = "float32") -> np.ndarray:
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.normal(size=(n, dim)))
    V, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    return ((U * np.logspace(0, -np.log10(condition), dim)) @ V * np.sqrt(n)).astype(dtype)


def triangular(r: np.ndarray) -> np.ndarray:
    """The unique upper-triangular, positive-diagonal square root of R^T R."""
    t = np.linalg.qr(r, mode="r")
    return t * np.sign(np.diag(t))[:, None]


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), log_condition=st.floats(0.0, 4.0), dim=st.integers(2, 32))
def test_gram_path_matches_householder_for_float32_up_to_condition_1e4(seed, log_condition, dim):
    X = conditioned_table(seed, 4000, dim, 10**log_condition)
    X64 = X.astype(np.float64)
    r_ref = triangular(np.linalg.qr(X64, mode="r"))
    r_gram = triangular(linalg.gram_factor(X64.T @ X64))
    assert np.linalg.norm(r_gram - r_ref) <= 1e-6 * np.linalg.norm(r_ref)
    sv_ref = np.linalg.svd(r_ref, compute_uv=False)
    sv_gram = np.linalg.svd(r_gram, compute_uv=False)
    np.testing.assert_allclose(sv_gram, sv_ref, rtol=1e-6)
    if 10**log_condition < 0.9 * linalg.GRAM_MAX_CONDITION:  # float32 rounding moves κ a little
        assert linalg.gram_is_accurate(X64.T @ X64, np.float32)


def test_tsqr_factor_matches_householder_exactly_enough():
    X = conditioned_table(1, 3000, 16, 1e7, "float64")
    r = dstab.stats._block_stats(X, (), None, None, 0, 1, qr=True)[0][0].r
    np.testing.assert_allclose(
        triangular(r), triangular(np.linalg.qr(X, mode="r")), rtol=0, atol=1e-12 * np.abs(r).max()
    )


def test_auto_chooses_by_dtype_and_conditioning():
    collapsed = random_tables(2, 800, 600, 16, "float32", rank=3)[0].astype(np.float64)
    assert linalg.gram_is_accurate(collapsed.T @ collapsed, np.float32)  # noise-level directions are ignored
    well = conditioned_table(3, 800, 8, 10.0).astype(np.float64)
    assert linalg.gram_is_accurate(well.T @ well, np.float32)
    assert not linalg.gram_is_accurate(well.T @ well, np.float64)
    ill = conditioned_table(3, 800, 8, 2e4).astype(np.float64)
    assert not linalg.gram_is_accurate(ill.T @ ill, np.float32)


@pytest.mark.parametrize("method", ["gram", "tsqr", "auto"])
def test_methods_agree_on_ordinary_tables(tmp_path: Path, method: str):
    T, W = random_tables(4, 2000, 1500, 16, "float32")
    new = dstab.open_version(write_version(tmp_path / "v", T, W, chunk_rows=300))
    result = dstab.stabilize(new, method=method)
    assert result.report["method"] == ("tsqr" if method == "tsqr" else "gram")
    RT, _, _ = reference_stabilize(T, W)
    np.testing.assert_allclose(result.items.compute(), RT, atol=1e-5 * np.abs(RT).max())


def test_auto_takes_householder_for_float64_and_ill_conditioned_float32(tmp_path: Path):
    T, W = random_tables(5, 1000, 800, 8, "float64")
    result = dstab.stabilize(dstab.open_version(write_version(tmp_path / "f64", T, W)))
    assert result.report["method"] == "tsqr"
    out = result.to_zarr(tmp_path / "o64")
    assert relative_score_error(T, W, *read_tables(out.url)) < 1e-10
    T = conditioned_table(6, 3000, 12, 1e6)
    W = conditioned_table(7, 2000, 12, 10.0)
    path = write_version(tmp_path / "ill", T, W, chunk_rows=500)
    auto = dstab.stabilize(dstab.open_version(path))
    gram = dstab.stabilize(dstab.open_version(path), method="gram")
    assert auto.report["method"] == "tsqr" and gram.report["method"] == "gram"

    def balance_error(result) -> float:
        """Largest deviation of the items' Gram from diag(σ), each entry relative to sqrt(σ_i σ_j)."""
        XT = T.astype(np.float64) @ result.transforms["items"]
        sv = result.singular_values[: result.rank]
        return float((np.abs(XT.T @ XT - np.diag(sv)) / np.sqrt(np.outer(sv, sv))).max())

    # Householder keeps even the weakest directions balanced; the Gram path cannot
    assert balance_error(auto) < 1e-6
    assert balance_error(gram) > 10 * balance_error(auto)


def test_cli_method_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from dstab.cli import main

    T, W = random_tables(8, 500, 400, 8, "float32")
    new = write_version(tmp_path / "v", T, W)
    assert (
        main(
            [
                "stabilize",
                new,
                "--out",
                str(tmp_path / "o"),
                "--method",
                "tsqr",
                "--scheduler",
                "synchronous",
                "--no-progress",
            ]
        )
        == 0
    )
    assert dstab.open_version(tmp_path / "o").attrs["report"]["method"] == "tsqr"
    assert main(["stabilize", new, "--out", str(tmp_path / "p"), "--method", "magic"]) == 2
