"""Which tables of a version score against which: the structure of an embedding model (pure, no I/O).

Two structures cover the models dstab serves:

* **two-sided** (``--sides Q1,Q2:C1,C2``): every query-side table is scored
  against every candidate-side table (users against items, creators, ...).
  Each side gets one transform, fitted from the pooled Gram of its tables;
  scores are kept by any pair of transforms ``M_Q M_C^T = I``.
* **symmetric** (``--symmetric``): every row of every table against every other
  (item2vec, graph and text embeddings, factorization machines). Only an
  orthogonal map keeps every dot product, so all tables share one.

A version with exactly the tables ``users`` and ``items`` is ``users:items``
unless told otherwise; a version of one table is symmetric; anything else must
be told. The structure is recorded in every output (``attrs["dstab"]["structure"]``)
so the next day's commands read it from there.

Inside the maths the sides are ordered candidate first (``sides[0]``), then
query: that order decides the deterministic sign rule, as items before users
always did.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from .errors import InputError, UsageError

Kind = Literal["two-sided", "symmetric"]

# The default two-sided structure: users are scored against items.
DEFAULT_QUERY, DEFAULT_CANDIDATE = "users", "items"
# Names a table may not have: a version keeps its saved transforms in the group ``transform``, one array per
# table beside ``transform/singular_values``.
RESERVED_TABLE_NAMES = ("transform", "singular_values")

# The --anchor word for every table (``both`` is the two-table spelling kept for old scripts).
ALL_TABLES = ("all", "both")


@dataclass(frozen=True)
class Structure:
    """The tables of a model and which score against which."""

    kind: Kind
    query: tuple[str, ...]  # two-sided: the query side; symmetric: every table
    candidate: tuple[str, ...] = ()  # two-sided: the candidate side; symmetric: empty

    @property
    def sides(self) -> tuple[tuple[str, ...], ...]:
        """The groups of tables that share one transform: (candidate, query), or (every table,)."""
        return (self.candidate, self.query) if self.kind == "two-sided" else (self.query,)

    @property
    def tables(self) -> tuple[str, ...]:
        return tuple(name for side in self.sides for name in side)

    def side_of(self, name: str) -> int:
        """Index into :attr:`sides` of the side holding ``name``."""
        for index, side in enumerate(self.sides):
            if name in side:
                return index
        raise KeyError(name)

    def partners(self, name: str) -> tuple[str, ...]:
        """The tables whose rows ``name``'s rows are scored against."""
        if self.kind == "symmetric":
            return self.query
        return self.candidate if name in self.query else self.query

    def to_attrs(self) -> dict[str, Any]:
        if self.kind == "symmetric":
            return {"kind": "symmetric", "tables": list(self.query)}
        return {"kind": "two-sided", "query": list(self.query), "candidate": list(self.candidate)}

    @classmethod
    def from_attrs(cls, attrs: Any) -> Structure | None:
        """The structure recorded in a version's attributes, or ``None`` if there is none or it is unreadable."""
        if not isinstance(attrs, dict):
            return None
        try:
            if attrs.get("kind") == "symmetric":
                return cls("symmetric", tuple(str(t) for t in attrs["tables"]))
            if attrs.get("kind") == "two-sided":
                return cls(
                    "two-sided", tuple(str(t) for t in attrs["query"]), tuple(str(t) for t in attrs["candidate"])
                )
        except (KeyError, TypeError):
            return None
        return None

    def flag(self) -> str:
        """The command-line flag that asks for this structure."""
        if self.kind == "symmetric":
            return "--symmetric"
        return f"--sides {','.join(self.query)}:{','.join(self.candidate)}"

    def __str__(self) -> str:
        if self.kind == "symmetric":
            return f"symmetric ({', '.join(self.query)})"
        return f"two-sided ({','.join(self.query)} scored against {','.join(self.candidate)})"


def check_table_name(name: str, where: str = "--table", error: type[Exception] = UsageError) -> None:
    """A table name is one Zarr group name that ``--sides`` and ``--anchor`` can list; ``error`` naming it and the fix if not."""
    bad = (
        not isinstance(name, str) or not name or name != name.strip() or any(c in name for c in "/\\,:= ")
        or name.startswith((".", "__")) or name in RESERVED_TABLE_NAMES
    )  # fmt: skip
    if bad:
        raise error(
            f"{where}: {name!r} cannot name a table; use a plain name (letters, digits, '_' or '-'), not empty, "
            "without '/', ',', ':', '=' or spaces, not starting with '.' or '__', and not 'transform' or "
            "'singular_values' (dstab keeps the saved transforms there)"
        )


def _names(text: str, where: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(","))
    if not names or any(not n for n in names):
        raise UsageError(
            f"--sides {where}: every side needs one or more table names, comma-separated (e.g. users:items,creators)"
        )
    return names


def parse_sides(text: str) -> Structure:
    """``Q1[,Q2...]:C1[,C2...]`` as a two-sided structure (the names are checked against a version later)."""
    if text.count(":") != 1:
        raise UsageError(
            f"--sides {text}: write the query tables, a colon, then the candidate tables, e.g. --sides users:items,creators"
        )
    query, candidate = (_names(part, text) for part in text.split(":"))
    return two_sided(query, candidate)


def two_sided(query: Iterable[str], candidate: Iterable[str]) -> Structure:
    query, candidate = tuple(query), tuple(candidate)
    for side in (query, candidate):
        repeated = sorted({n for n in side if side.count(n) > 1})
        if repeated:
            raise UsageError(f"--sides names {repeated[0]!r} twice on one side; name each table once")
    both = [n for n in query if n in candidate]
    if both:
        raise UsageError(
            f"table {both[0]!r} is on both sides of --sides {','.join(query)}:{','.join(candidate)}; a table "
            "belongs to one side (for tables scored against themselves and each other use --symmetric)"
        )
    return Structure("two-sided", query, candidate)


def symmetric(tables: Iterable[str]) -> Structure:
    return Structure("symmetric", tuple(tables))


def default_structure(names: Iterable[str]) -> Structure | None:
    """``users:items`` for exactly those two tables, symmetric for one table, else ``None`` (it must be told)."""
    names = tuple(names)
    if sorted(names) == sorted((DEFAULT_QUERY, DEFAULT_CANDIDATE)):
        return Structure("two-sided", (DEFAULT_QUERY,), (DEFAULT_CANDIDATE,))
    if len(names) == 1:
        return symmetric(names)
    return None


def resolve(
    names: Iterable[str],
    *,
    sides: str | Structure | None = None,
    symmetric_all: bool = False,
    recorded: Structure | None = None,
    label: str = "the version",
) -> Structure:
    """The structure a run uses: the one asked for, else the one recorded, else the default for the tables.

    Raises :class:`UsageError` naming the tables and both flags when none applies,
    and :class:`InputError` when the structure names tables the version lacks or
    leaves some of its tables out.
    """
    names = tuple(names)
    if sides is not None and symmetric_all:
        raise UsageError("--sides and --symmetric each give the structure; pass one of them")
    asked: Structure | None = None
    if isinstance(sides, str):
        asked = parse_sides(sides)
    elif isinstance(sides, Structure):
        asked = sides
    elif symmetric_all:
        asked = symmetric(names)
    structure = asked or recorded or default_structure(names)
    if structure is None:
        listed = ", ".join(names)
        query = DEFAULT_QUERY if DEFAULT_QUERY in names else names[0]  # users are the usual query side
        example = f"{query}:{','.join(n for n in names if n != query)}"
        raise UsageError(
            f"{label} has the tables {listed}: say which score against which, with --sides QUERY:CANDIDATE "
            f"(e.g. --sides {example}) for a two-sided model, or --symmetric when every table is scored against every other"
        )
    origin = (
        structure.flag()
        if asked is not None
        else f"the structure recorded ({structure})"
        if recorded
        else f"the default ({structure})"
    )
    check_tables_named(structure, names, label, origin)
    return structure


def check_agrees(asked: Structure, recorded: Structure | None, label: str, names: Iterable[str]) -> None:
    """A structure asked for on the command line must be the one the input records (the model that made it).

    A record that no longer fits the tables (one was removed since) is stale: then the flag decides.
    """
    if recorded is not None and set(recorded.tables) == set(names) and not same_structure(asked, recorded):
        raise InputError(
            f"{label} records {recorded}, but {asked.flag()} asks for {asked}; the recorded structure is the model's "
            f"(another would not keep its scores): drop {'--sides' if asked.kind == 'two-sided' else '--symmetric'}"
        )


def same_structure(a: Structure, b: Structure) -> bool:
    """The same kind and the same tables on each side (the order of tables within a side does not matter)."""
    return (a.kind, [sorted(side) for side in a.sides]) == (b.kind, [sorted(side) for side in b.sides])


def check_tables_named(structure: Structure, names: Iterable[str], label: str, origin: str | None = None) -> None:
    """Every table the structure names exists, and every table of the version is in the structure.

    ``origin`` says where the structure came from (a flag, or what the version records).
    """
    names, origin = tuple(names), origin or structure.flag()
    missing = [n for n in structure.tables if n not in names]
    if missing:
        raise InputError(
            f"{origin} names the table {missing[0]!r}, but {label} has only the tables {', '.join(names)}; "
            "name tables that exist"
        )
    left = [n for n in names if n not in structure.tables]
    if left:
        raise InputError(
            f"{origin} leaves out the table {left[0]!r} of {label} (tables: {', '.join(names)}); "
            "every table must be on a side: name it in --sides, or use --symmetric"
        )


def parse_anchor(anchor: str | Iterable[str], structure: Structure) -> tuple[str, ...]:
    """The tables whose rows fix the rotation: ``all`` (or ``both``), or table names (comma-separated)."""
    if isinstance(anchor, str):
        if anchor in ALL_TABLES:
            return structure.tables
        wanted = tuple(n.strip() for n in anchor.split(","))
    else:
        wanted = tuple(anchor)
    repeated = sorted({n for n in wanted if wanted.count(n) > 1})
    if repeated:
        raise UsageError(f"--anchor names {repeated[0]!r} twice; name each table once")
    unknown = [n for n in wanted if n not in structure.tables]
    if not wanted or unknown or any(not n for n in wanted):
        raise UsageError(
            f"--anchor {anchor if isinstance(anchor, str) else ','.join(anchor)}: name tables of the version "
            f"({', '.join(structure.tables)}), comma-separated, or 'all'"
        )
    return tuple(n for n in structure.tables if n in wanted)  # in the structure's order, each once
