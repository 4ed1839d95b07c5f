"""MovieLens: 100K (u.data/u.item), 1M (ratings.dat/movies.dat, '::', latin-1), 20M/25M/latest (csv).

Condition fields: ``genre`` (an item attribute: the movie's first listed genre) and ``rating``
(a behaviour attribute: the rating rounded up to a bucket 1..5). Both are MASK in evaluation
queries, since the held-out movie's genre and rating would leak information about it. Item tags
(``model.overrides.item_tags``): all of the movie's genres.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pyarrow as pa

from lum_dist.data.errors import DataError
from lum_dist.data.ingest.common import (
    GENERIC_EVAL,
    RawBehaviours,
    attach_item_attrs,
    finish_table,
    input_path,
    read_delimited,
    require_file,
)

ML100K_GENRES = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]
FIELDS = ["genre", "rating"]


def _folder(source: dict, fmt: str) -> Path:
    path = input_path(source, fmt)
    return path if path.is_dir() else path.parent


def _ratings(
    data: bytes,
    file: str,
    delimiter: str,
    header: bool,
    encoding: str,
    max_rating: float,
    movies: pa.Table,
    movies_file: str,
    source: dict,
    name: str,
) -> RawBehaviours:
    skipped: dict[str, int] = {}
    names = ["user", "item", "rating", "ts"]
    cols, check = read_delimited(
        data, file, names, delimiter, source.get("skip_bad", False), skipped, header=header, encoding=encoding
    )
    check.non_empty(cols["user"], "user")
    check.integers(cols["item"], "item", lo=1)
    rating = check.floats(cols["rating"], "rating", lo=0.5, hi=max_rating)
    ts = check.integers(cols["ts"], "ts", lo=0)
    bucket = np.clip(np.ceil(rating), 1, 5).astype(np.int64).astype(str)
    columns = {"user": cols["user"], "item": cols["item"], "ts": pa.array(ts, pa.int64())}
    attach_item_attrs(columns, movies, ["genre"], check, movies_file)
    columns["cond_rating"] = pa.array(bucket, pa.string())
    return RawBehaviours(
        name=name,
        table=finish_table(columns, check, skipped),
        cond_fields=FIELDS,
        item_cond_fields=["genre"],
        item_attrs=movies,
        eval_condition={f: GENERIC_EVAL for f in FIELDS},
        skipped=skipped,
    )


def movielens_100k(source: dict) -> RawBehaviours:
    folder = _folder(source, "movielens-100k")
    data_file = require_file(folder / "u.data", "movielens-100k", "u.data (user<TAB>item<TAB>rating<TAB>ts)")
    item_file = require_file(
        folder / "u.item", "movielens-100k", "u.item ('|'-separated, latin-1, 24 fields)"
    )
    genres = ML100K_GENRES
    if (folder / "u.genre").is_file():
        genres = [
            ln.split("|")[0] for ln in (folder / "u.genre").read_text("latin-1").splitlines() if ln.strip()
        ]
    ids, first, tags = [], [], []
    for lineno, line in enumerate(item_file.read_text("latin-1").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("|")
        if len(parts) != 5 + len(genres):
            raise DataError(
                item_file, lineno, "genres", f"expected {5 + len(genres)} fields, got {len(parts)}"
            )
        flags = parts[5:]
        if any(f not in ("0", "1") for f in flags):
            raise DataError(item_file, lineno, "genres", f"genre flags must be 0/1, got {flags}")
        ids.append(parts[0].strip())
        first.append(genres[flags.index("1")] if "1" in flags else "unknown")
        tags.append([g for g, f in zip(genres, flags, strict=True) if f == "1"] or ["unknown"])
    movies = _movies_table(ids, first, tags)
    return _ratings(
        data_file.read_bytes(),
        str(data_file),
        "\t",
        False,
        "utf8",
        5,
        movies,
        str(item_file),
        source,
        "ml-100k",
    )


def _movies_from_rows(rows: list[tuple[int, list[str]]], file: Path) -> pa.Table:
    ids, first, tags = [], [], []
    for lineno, parts in rows:
        if len(parts) < 3:
            raise DataError(
                file, lineno, "genres", f"expected 3 fields (id, title, genres), got {len(parts)}"
            )
        ids.append(parts[0].strip())
        genres = [g.strip() for g in parts[-1].split("|") if g.strip()] or ["unknown"]
        first.append(genres[0])
        tags.append(genres)
    return _movies_table(ids, first, tags)


def _movies_table(ids: list[str], first: list[str], tags: list[list[str]]) -> pa.Table:
    """Item attributes: the first listed genre (the condition field) and all genres (the item's tags)."""
    return pa.table({"item": pa.array(ids, pa.string()), "genre": pa.array(first, pa.string()),
                     "tags": pa.array(tags, pa.list_(pa.string()))})


def movielens_1m(source: dict) -> RawBehaviours:
    folder = _folder(source, "movielens-1m")
    data_file = require_file(
        folder / "ratings.dat", "movielens-1m", "ratings.dat (UserID::MovieID::Rating::Timestamp)"
    )
    item_file = require_file(
        folder / "movies.dat", "movielens-1m", "movies.dat (MovieID::Title::Genres, latin-1)"
    )
    rows = [
        (i, ln.split("::"))
        for i, ln in enumerate(item_file.read_text("latin-1").splitlines(), 1)
        if ln.strip()
    ]
    movies = _movies_from_rows(rows, item_file)
    return _ratings(
        data_file.read_bytes(),
        str(data_file),
        "::",
        False,
        "latin-1",
        5,
        movies,
        str(item_file),
        source,
        "ml-1m",
    )


def movielens_csv(source: dict) -> RawBehaviours:
    folder = _folder(source, "movielens-csv")
    data_file = require_file(
        folder / "ratings.csv", "movielens-csv", "ratings.csv (userId,movieId,rating,timestamp)"
    )
    item_file = require_file(folder / "movies.csv", "movielens-csv", "movies.csv (movieId,title,genres)")
    reader = csv.reader(io.StringIO(item_file.read_text("utf-8")))
    rows = [(i, r) for i, r in enumerate(reader, 1) if r and i > 1]  # line 1 is the header
    movies = _movies_from_rows(rows, item_file)
    return _ratings(
        data_file.read_bytes(),
        str(data_file),
        ",",
        True,
        "utf8",
        5,
        movies,
        str(item_file),
        source,
        folder.name or "movielens",
    )
