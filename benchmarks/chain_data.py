"""Real retrains for the long-chain benchmark: implicit-feedback ALS on MovieLens 100K, one seed a day.

    python benchmarks/chain_data.py [--days 15] [--factors 64] [--iterations 15] [--seed0 0]

Library: ``implicit`` 0.7.3 (``implicit.cpu.als.AlternatingLeastSquares``, the conjugate-gradient CPU
solver, float32), the library the issue's own figures came from.

Dataset: MovieLens 100K (GroupLens; 943 users, 1682 movies, 100,000 ratings 1-5), as shipped inside the
wheel of RecBole 1.2.1 (MIT licence; PyPI ``recbole``) at ``recbole/dataset_example/ml-100k/ml-100k.inter``
(1,979,230 bytes, tab-separated ``user_id:token item_id:token rating:float timestamp:float`` with a header
line). Nothing is downloaded at run time: the file is found through the installed ``recbole`` package,
located with ``importlib.util.find_spec`` so that recbole's own (heavy: torch, ray) dependencies are never
imported; install it with ``pip install --no-deps recbole==1.2.1``. MovieLens data is under GroupLens'
terms of use (research use, cite Harper & Konstan 2015, no redistribution): this file reads the copy
RecBole ships, it does not copy it into dstab.

Training: the ratings are the implicit-feedback strengths (users x items CSR, float32, confidence
``1 + alpha * rating`` in implicit's CG solver with ``alpha=1``); ``factors=64``, ``regularization=0.05``,
``iterations=15``, one thread (``num_threads=1`` and BLAS limited to one thread, so that a seed gives the
same factors on every machine), ``random_state = seed0 + day``. Each retrain sees the same data; only the
random initial factors differ, as in the issue's 15-seed chain. 15 retrains take about 4 s on a shared
core (see ``main``).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

# The dataset's location inside its package; the package is found, never imported.
DATA_PACKAGE = "recbole"
DATA_FILE = ("dataset_example", "ml-100k", "ml-100k.inter")


def dataset_path() -> Path:
    """The MovieLens 100K interaction file inside the installed ``recbole`` package."""
    spec = importlib.util.find_spec(DATA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            f"{DATA_PACKAGE} is not installed: `pip install --no-deps recbole==1.2.1` "
            "(only its bundled MovieLens 100K file is used)"
        )
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*DATA_FILE)
    if not path.is_file():
        raise SystemExit(f"{path} is missing from the installed {DATA_PACKAGE}: reinstall recbole==1.2.1")
    return path


def load_interactions(path: Path | None = None) -> tuple[np.ndarray, np.ndarray, sp.csr_matrix]:
    """``(user_ids, item_ids, ratings)``: sorted int64 ids and a users x items float32 CSR of ratings."""
    raw = np.loadtxt(path or dataset_path(), skiprows=1, usecols=(0, 1, 2), dtype=np.float64)
    users, items = raw[:, 0].astype(np.int64), raw[:, 1].astype(np.int64)
    user_ids, u_row = np.unique(users, return_inverse=True)
    item_ids, i_col = np.unique(items, return_inverse=True)
    ratings = sp.csr_matrix((raw[:, 2].astype(np.float32), (u_row, i_col)), shape=(user_ids.size, item_ids.size))
    ratings.sum_duplicates()  # ML-100K has none; keeps the CSR canonical either way
    return user_ids, item_ids, ratings


def retrains(
    n_days: int,
    factors: int = 64,
    seed0: int = 0,
    iterations: int = 15,
    regularization: float = 0.05,
    threads: int = 1,
) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray, np.ndarray]:
    """``n_days`` ALS retrains (seeds ``seed0 .. seed0 + n_days - 1``) on MovieLens 100K.

    Returns ``(users, items, user_ids, item_ids)``: per day the float32 user factors (943 x factors) and
    item factors (1682 x factors), rows in the order of the int64 ids (the dataset's own user / movie ids).
    """
    from implicit.cpu.als import AlternatingLeastSquares  # type: ignore[import-untyped]  # `bench` extra

    user_ids, item_ids, ratings = load_interactions()
    users: list[np.ndarray] = []
    items: list[np.ndarray] = []
    # One BLAS thread: implicit warns otherwise (its own threads fight BLAS's), and fixed threads keep a
    # seed's factors the same from run to run.
    with threadpool_limits(1, "blas"):
        for day in range(n_days):
            model = AlternatingLeastSquares(
                factors=factors,
                regularization=regularization,
                iterations=iterations,
                dtype=np.float32,
                num_threads=threads,
                random_state=seed0 + day,
            )
            model.fit(ratings, show_progress=False)
            users.append(np.ascontiguousarray(model.user_factors, dtype=np.float32))
            items.append(np.ascontiguousarray(model.item_factors, dtype=np.float32))
    return users, items, user_ids, item_ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=15)
    parser.add_argument("--factors", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=15)
    parser.add_argument("--seed0", type=int, default=0)
    args = parser.parse_args(argv)
    path = dataset_path()
    print(f"data: {path} ({path.stat().st_size} bytes)")
    start = time.perf_counter()
    users, items, user_ids, item_ids = retrains(args.days, args.factors, args.seed0, args.iterations)
    elapsed = time.perf_counter() - start
    print(
        f"{args.days} retrains, {user_ids.size} users x {item_ids.size} items, {args.factors} factors, "
        f"{args.iterations} iterations: {elapsed:.2f} s ({elapsed / args.days:.3f} s each, with loading)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
