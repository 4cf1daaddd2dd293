"""A scikit-learn-style estimator around :func:`dstab.stabilize`: parameters in ``__init__``, ``fit``, ``transform``.

    >>> import dstab
    >>> est = dstab.Stabilizer().fit({"users": U_today, "items": I_today}, reference={"users": U_prev, "items": I_prev})
    >>> stable = est.transform({"users": U_today, "items": I_today})   # numpy in, numpy out; Dask in, lazy out

As in scikit-learn, dask-ml and graspologic: ``__init__`` only stores the
parameters (the keywords of :func:`dstab.stabilize`), :meth:`Stabilizer.fit`
returns the estimator, and what it learned ends in ``_`` (``transforms_``,
``singular_values_``, ``rank_``, ``structure_``, ``report_``,
``n_features_in_``, and ``stabilization_``, the underlying
:class:`~dstab.stabilize.Stabilization`). Inputs are whatever
:func:`dstab.store.coerce.as_version` accepts: a version, its path, or a
mapping of tables (numpy, Dask or Zarr arrays, or their paths). Dask stays
lazy throughout: a Dask or Zarr input gives a Dask array that nothing has
computed.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from typing import Any, Literal

import dask.array as da
import numpy as np
import zarr

from .errors import UsageError
from .stabilize import AnchorWeights, Method, Stabilization, VersionLike, stabilize
from .store import Table
from .store.coerce import checked_array, kind_of, open_path
from .store.model import unit_rows
from .structure import Structure

# What fit learns; each is absent until then (hasattr is False, reading one names fit).
LEARNED = (
    "transforms_",
    "singular_values_",
    "rank_",
    "structure_",
    "report_",
    "n_features_in_",
    "stabilization_",
)


class NotFittedError(UsageError, AttributeError):
    """The estimator is used before :meth:`Stabilizer.fit` (a ValueError and an AttributeError, as in scikit-learn)."""


class Stabilizer:
    """Fit the stabilization of a new version onto yesterday's stabilized one; map tables with it.

    The parameters are those of :func:`dstab.stabilize` (see there): ``rank``
    (``"auto"`` or an int), ``rtol``, ``sides`` (``"users:items,creators"``),
    ``symmetric``, ``anchor``, ``anchor_min_count``, ``anchor_weights``
    (``"uniform"`` or ``"counts"``), ``method`` (``"auto"``, ``"gram"``,
    ``"tsqr"``), ``reference_weights`` (one per reference when :meth:`fit`
    gets a list of them; default equal) and ``in_memory`` (``"auto"``, ``True``,
    ``False``: whether :meth:`fit` keeps the new tables' blocks in memory for
    :meth:`to_zarr`, which lets them go). Nothing is checked or computed until
    :meth:`fit`.
    """

    def __init__(
        self,
        rank: int | Literal["auto"] = "auto",
        rtol: float | None = None,
        sides: str | Structure | None = None,
        symmetric: bool = False,
        anchor: str = "all",
        anchor_min_count: float | None = None,
        anchor_weights: AnchorWeights = "uniform",
        method: Method = "auto",
        reference_weights: list[float] | tuple[float, ...] | None = None,
        in_memory: bool | Literal["auto"] = "auto",
    ) -> None:
        self.rank = rank
        self.rtol = rtol
        self.sides = sides
        self.symmetric = symmetric
        self.anchor = anchor
        self.anchor_min_count = anchor_min_count
        self.anchor_weights = anchor_weights
        self.method = method
        self.reference_weights = reference_weights
        self.in_memory = in_memory

    # ------------------------------------------------------------------------- parameters

    @classmethod
    def _param_names(cls) -> list[str]:
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The parameters given to ``__init__`` (``deep`` is accepted for scikit-learn; nothing is nested)."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> Stabilizer:
        """Set parameters by name and return the estimator; an unknown name is a :class:`UsageError`."""
        names = self._param_names()
        for key in params:
            if key not in names:
                raise UsageError(f"Stabilizer has no parameter {key!r}; its parameters are {', '.join(names)}")
        for key, value in params.items():
            setattr(self, key, value)
        return self

    def __repr__(self) -> str:
        defaults = {p.name: p.default for p in inspect.signature(type(self).__init__).parameters.values()}
        changed = [f"{k}={v!r}" for k, v in self.get_params().items() if not _same(v, defaults[k])]
        return f"{type(self).__name__}({', '.join(changed)})"

    def __getattr__(self, name: str) -> Any:
        # only called for attributes that are missing: a learned one is missing until fit
        if name in LEARNED:
            raise NotFittedError(
                f"this Stabilizer is not fitted yet, so it has no {name}: call fit(new, reference) first"
            )
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __sklearn_is_fitted__(self) -> bool:
        return "stabilization_" in self.__dict__

    # ------------------------------------------------------------------------- fitting

    def fit(
        self,
        new: VersionLike,
        reference: VersionLike | list[Any] | tuple[Any, ...] | None = None,
        *,
        ids: Mapping[str, Any] | None = None,
        counts: Mapping[str, Any] | None = None,
        reference_ids: Mapping[str, Any] | None = None,
        storage_options: dict[str, Any] | None = None,
        progress: bool = False,
    ) -> Stabilizer:
        """Fit on ``new`` (against ``reference``, yesterday's stabilized tables, or a list of references weighed by
        ``reference_weights``; none the first day). Returns self.

        One read pass of ``new`` and the reference's anchor tables on the active
        Dask scheduler. ``ids`` / ``counts`` (``{name: array}``) go with in-memory
        new tables, ``reference_ids`` with in-memory reference tables, so that rows
        are matched by id; table groups bring their own.
        """
        result = stabilize(
            new,
            reference,
            ids=ids,
            counts=counts,
            reference_ids=reference_ids,
            storage_options=storage_options,
            progress=progress,
            **self._stabilize_keywords(),
        )
        self.stabilization_ = result
        self.transforms_ = dict(result.transforms)
        self.singular_values_ = result.singular_values
        self.rank_ = result.rank
        self.structure_ = result.structure
        self.report_ = result.report
        self.n_features_in_ = result.new.dim
        self._storage_options = storage_options
        return self

    def _stabilize_keywords(self) -> dict[str, Any]:
        params = self.get_params()
        # None means "no filter", which stabilize() spells 0
        params["anchor_min_count"] = 0.0 if params["anchor_min_count"] is None else params["anchor_min_count"]
        return params

    def _fitted(self, what: str) -> Stabilization:
        if "stabilization_" not in self.__dict__:
            raise NotFittedError(f"this Stabilizer is not fitted yet: call fit(new, reference) before {what}")
        result: Stabilization = self.stabilization_
        return result

    # ------------------------------------------------------------------------- applying

    def transform(self, X: Any, table: str | None = None) -> Any:
        """Map raw rows into the stabilized space: the same kind back.

        ``X`` is a mapping ``{table: rows}`` (a dict of results back) or one
        array with ``table=NAME`` (``NAME`` may be left out when the model has
        one table). numpy rows give numpy; Dask rows give a lazy Dask array with
        the same row chunks; a Zarr array, or the path of one or of a table
        group, gives a lazy Dask array read block by block. Nothing is computed.
        """
        result = self._fitted("transform")
        if isinstance(X, Mapping):
            if table is not None:
                raise UsageError("table= names the table of a single array, but X is a mapping of tables: drop table=")
            return {name: self._transform_one(result, name, rows) for name, rows in X.items()}
        if table is None:
            names = list(result.transforms)
            if len(names) != 1:
                raise UsageError(
                    f"transform was given one array ({kind_of(X)}) and the model has the tables {', '.join(names)}: "
                    f"say which with table=NAME, or pass a mapping {{name: rows}}"
                )
            table = names[0]
        return self._transform_one(result, table, X)

    def _transform_one(self, result: Stabilization, name: str, rows: Any) -> Any:
        result._transform_of(name)  # an unknown table is named before its rows are looked at
        where = f"the rows given for {name!r}"
        if isinstance(rows, (str, os.PathLike)):
            rows = open_path(os.fspath(rows), getattr(self, "_storage_options", None), where=where).vectors
        if isinstance(rows, zarr.Array):
            # blocks of whole storage chunks, as every read of a version makes them
            rows = Table(name=name, vectors=rows, ids=None, chunk_rows=unit_rows(rows)).read()
        elif not isinstance(rows, da.Array):
            rows = checked_array(rows, where)
        return result.transform(name, rows)

    def fit_transform(
        self,
        new: VersionLike,
        reference: VersionLike | list[Any] | tuple[Any, ...] | None = None,
        **fit_params: Any,
    ) -> dict[str, Any]:
        """:meth:`fit`, then the stabilized tables of ``new`` as a dict.

        A numpy table comes back as numpy; a Dask table as a lazy Dask array in
        its own row chunks; a Zarr or stored table as a lazy Dask array.
        """
        result = self.fit(new, reference, **fit_params)._fitted("fit_transform")
        if not isinstance(new, Mapping):
            return {name: result.stabilized(name) for name in result.new.names}
        out: dict[str, Any] = {}
        for name, rows in new.items():
            if isinstance(rows, da.Array):
                out[name] = result.transform(name, rows)
            elif isinstance(rows, (str, os.PathLike, zarr.Array)):
                out[name] = result.stabilized(name)
            else:
                out[name] = result.transform(name, np.asarray(rows))
        return out

    def to_zarr(self, out: str | os.PathLike[str], **kwargs: Any) -> Any:
        """Write the stabilized version to ``out`` and return it, opened; ``compute=False`` defers it (see :meth:`Stabilization.to_zarr`)."""
        return self._fitted("to_zarr").to_zarr(out, **kwargs)


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) and type(a) is type(b)
    except (TypeError, ValueError):
        return a is b


__all__ = ["LEARNED", "NotFittedError", "Stabilizer"]
