"""Each ingest adapter on small files in the real format: parsing, conditions, and bad input.

Bad input must raise DataError naming file, line and field, or (skip_bad) be counted.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import pytest

from lum_dist.data.errors import DataError
from lum_dist.data.ingest import ADAPTERS, get_adapter

U_ITEM = (
    "1|Toy Story (1995)|01-Jan-1995||http://x|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
    "2|GoldenEye (1995)|01-Jan-1995||http://x|0|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0|1|0|0\n"
    "3|Unknown (1995)|01-Jan-1995||http://x|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
)


def _ml100k(tmp_path: Path, data: str) -> dict:
    (tmp_path / "u.data").write_text(data)
    (tmp_path / "u.item").write_bytes(U_ITEM.encode("latin-1"))
    return {"format": "movielens-100k", "input": str(tmp_path)}


def _rows(raw) -> list[dict]:
    return raw.table.to_pylist()


def test_movielens_100k_parses_conditions(tmp_path):
    raw = get_adapter("movielens-100k")(_ml100k(tmp_path, "7\t1\t5\t100\n7\t2\t3\t50\n8\t3\t1\t10\n"))
    assert raw.cond_fields == ["genre", "rating"] and raw.item_cond_fields == ["genre"]
    assert _rows(raw) == [
        {"user": "7", "item": "1", "ts": 100, "cond_genre": "Animation", "cond_rating": "5"},
        {"user": "7", "item": "2", "ts": 50, "cond_genre": "Action", "cond_rating": "3"},
        {"user": "8", "item": "3", "ts": 10, "cond_genre": "unknown", "cond_rating": "1"},
    ]
    assert all(v.startswith("MASK") for v in raw.eval_condition.values())
    # Item tags: every genre flag of the movie (GoldenEye is Action, Adventure and Thriller).
    tags = dict(zip(raw.item_attrs.column("item").to_pylist(), raw.item_attrs.column("tags").to_pylist(), strict=True))
    assert tags == {"1": ["Animation", "Children's", "Comedy"], "2": ["Action", "Adventure", "Thriller"],
                    "3": ["unknown"]}


def test_movielens_100k_bad_ts_names_file_line_field(tmp_path):
    source = _ml100k(tmp_path, "7\t1\t5\t100\n7\t2\t3\t50\n8\t3\t1\tabc\n8\t1\t1\t-5\n")
    with pytest.raises(DataError, match=r"^u\.data line 3: field 'ts': 'abc' is not an integer") as e:
        get_adapter("movielens-100k")(source)
    assert (e.value.line, e.value.field) == (3, "ts") and e.value.file.endswith("u.data")
    raw = get_adapter("movielens-100k")({**source, "skip_bad": True})
    assert raw.table.num_rows == 2 and raw.skipped == {"not_an_integer": 1, "out_of_range": 1}


@pytest.mark.parametrize(
    "line, message",
    [
        (
            "8\t9\t1\t10",
            r"u\.data line 2: field 'item': '9' is not in u\.item",
        ),  # id out of range of the catalogue
        ("8\t0\t1\t10", r"u\.data line 2: field 'item': 0 is out of range"),
        ("8\t1\t7\t10", r"u\.data line 2: field 'rating': 7 is out of range"),
        ("8\t1\t1\t-1", r"u\.data line 2: field 'ts': -1 is out of range"),  # a negative timestamp
        ("8\t1\t1", r"u\.data line 2: field 'ts': expected 4 fields"),  # malformed line: slow path names it
        ("\t1\t1\t5", r"u\.data line 2: field 'user': is empty"),
    ],
)
def test_movielens_100k_bad_lines(tmp_path, line, message):
    source = _ml100k(tmp_path, f"7\t1\t5\t100\n{line}\n7\t2\t3\t50\n")
    with pytest.raises(DataError, match=message):
        get_adapter("movielens-100k")(source)
    raw = get_adapter("movielens-100k")({**source, "skip_bad": True})
    assert raw.table.num_rows == 2 and sum(raw.skipped.values()) == 1


def test_blank_lines_keep_line_numbers(tmp_path):
    source = _ml100k(tmp_path, "7\t1\t5\t100\n\n7\t2\t3\tx\n")
    with pytest.raises(DataError, match=r"u\.data line 3: field 'ts'"):
        get_adapter("movielens-100k")(source)


def test_missing_files_and_unknown_format(tmp_path):
    (tmp_path / "u.data").write_text("1\t1\t1\t1\n")
    with pytest.raises(FileNotFoundError, match=r"movielens-100k: expected u\.item .* at .*u\.item"):
        get_adapter("movielens-100k")({"format": "movielens-100k", "input": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_adapter("s3rec")({"format": "s3rec", "input": str(tmp_path / "nope.txt")})
    with pytest.raises(ValueError, match=r"unknown source format 'parquet'.*'movielens-100k'"):
        get_adapter("parquet")
    assert {
        "movielens-100k",
        "movielens-1m",
        "movielens-csv",
        "amazon-5core",
        "s3rec",
        "taobao",
        "synthetic",
    } <= set(ADAPTERS)


def test_movielens_1m_latin1_double_colon(tmp_path):
    (tmp_path / "ratings.dat").write_text("1::10::5::978300760\n1::20::4::978300761\n")
    (tmp_path / "movies.dat").write_bytes(
        "10::Amélie (2001)::Comedy|Romance\n20::Heat::Action\n".encode("latin-1")
    )
    raw = get_adapter("movielens-1m")({"format": "movielens-1m", "input": str(tmp_path)})
    assert [(r["item"], r["cond_genre"], r["cond_rating"]) for r in _rows(raw)] == [
        ("10", "Comedy", "5"),
        ("20", "Action", "4"),
    ]
    (tmp_path / "ratings.dat").write_text("1::10::5::978300760\n1::20::4\n1::20::4::978300762\n")
    source = {"format": "movielens-1m", "input": str(tmp_path)}
    with pytest.raises(DataError, match=r"ratings\.dat line 2: field 'ts': expected 4 fields"):
        get_adapter("movielens-1m")(source)
    raw = get_adapter("movielens-1m")({**source, "skip_bad": True})
    assert raw.table.num_rows == 2 and raw.skipped == {"wrong_field_count": 1}


def test_movielens_csv_half_stars(tmp_path):
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,5,0.5,10\n1,6,3.5,11\n")
    (tmp_path / "movies.csv").write_text(
        'movieId,title,genres\n5,"Toy, Story",Animation|Kids\n6,X,(no genres listed)\n'
    )
    raw = get_adapter("movielens-csv")({"format": "movielens-csv", "input": str(tmp_path)})
    assert [(r["cond_genre"], r["cond_rating"]) for r in _rows(raw)] == [
        ("Animation", "1"),
        ("(no genres listed)", "4"),
    ]
    assert raw.item_attrs.column("tags").to_pylist() == [["Animation", "Kids"], ["(no genres listed)"]]
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,5,0.5,10\n1,6,six,11\n")
    with pytest.raises(DataError, match=r"ratings\.csv line 3: field 'rating': 'six' is not a number"):
        get_adapter("movielens-csv")({"format": "movielens-csv", "input": str(tmp_path)})


def _review(user, asin, rating, ts):
    return json.dumps(
        {"reviewerID": user, "asin": asin, "overall": rating, "unixReviewTime": ts, "summary": "ok"}
    )


def test_amazon_json_in_zip_with_meta(tmp_path):
    lines = [_review("A", "x1", 5.0, 100), _review("A", "x2", 2.0, 90), _review("B", "x1", 4.0, 80)]
    with zipfile.ZipFile(tmp_path / "Music.zip", "w") as z:
        z.writestr("Music.json", "\n".join(lines) + "\n")
    raw = get_adapter("amazon-5core")({"format": "amazon-5core", "input": str(tmp_path / "Music.zip")})
    assert raw.cond_fields == ["rating"] and [r["cond_rating"] for r in _rows(raw)] == ["5", "2", "4"]
    meta = tmp_path / "meta.json"  # 2014 meta files are Python literals, not JSON
    meta.write_text(
        "{'asin': 'x1', 'categories': [['Music', 'Guitars']]}\n{'asin': 'x2', 'categories': [['Music']]}\n"
    )
    raw = get_adapter("amazon-5core")(
        {"format": "amazon-5core", "input": str(tmp_path / "Music.zip"), "meta": str(meta)}
    )
    assert raw.cond_fields == ["category", "rating"]
    assert [r["cond_category"] for r in _rows(raw)] == ["Guitars", "Music", "Guitars"]


def test_amazon_bad_json_and_csv(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(_review("A", "x1", 5.0, 100) + "\n{broken\n" + _review("A", "x2", 5.0, "late") + "\n")
    with pytest.raises(DataError, match=r"r\.json line 2: not valid JSON"):
        get_adapter("amazon-5core")({"format": "amazon-5core", "input": str(path)})
    raw = get_adapter("amazon-5core")({"format": "amazon-5core", "input": str(path), "skip_bad": True})
    assert raw.table.num_rows == 1 and raw.skipped == {"bad_json": 1, "not_an_integer": 1}
    csv = tmp_path / "ratings_Music.csv"
    csv.write_text("A,x1,5.0,100\nB,x2,4.0,101\n")
    raw = get_adapter("amazon-5core")({"format": "amazon-5core", "input": str(csv)})
    assert [(r["user"], r["item"], r["ts"]) for r in _rows(raw)] == [("A", "x1", 100), ("B", "x2", 101)]


def _s3rec(tmp_path: Path, text: str, attrs: dict | None = None) -> dict:
    (tmp_path / "Toy.txt").write_text(text)
    attrs = attrs or {str(i): [100 + i, 7] for i in range(1, 10)}
    (tmp_path / "Toy_item2attributes.json").write_text(json.dumps(attrs))
    return {"format": "s3rec", "input": str(tmp_path / "Toy.txt")}


def test_s3rec_ordinal_ts_and_first_attribute(tmp_path):
    raw = get_adapter("s3rec")(_s3rec(tmp_path, "1 3 2 5\n2 4 4\n"))
    assert not raw.has_timestamps and raw.cond_fields == ["category"]
    assert [(r["user"], r["item"], r["ts"], r["cond_category"]) for r in _rows(raw)] == [
        ("1", "3", 0, "103"),
        ("1", "2", 1, "102"),
        ("1", "5", 2, "105"),
        ("2", "4", 0, "104"),
        ("2", "4", 1, "104"),
    ]
    tags = dict(zip(raw.item_attrs.column("item").to_pylist(), raw.item_attrs.column("tags").to_pylist(), strict=True))
    assert tags["3"] == ["103", "7"]  # every attribute, the first of which is the condition


@pytest.mark.parametrize(
    "text, message, reason",
    [
        ("1 3 2\n2\n3 1 1\n", r"Toy\.txt line 2: field 'items': user '2' has no items", "empty_user"),
        ("1 3 2\n2 0 1\n3 1 1\n", r"Toy\.txt line 2: field 'item': 0 is out of range", "out_of_range"),
        ("1 3 2\n2 x 1\n3 1 1\n", r"Toy\.txt line 2: field 'item': 'x' is not an integer", "not_an_integer"),
        (
            "1 3 2\n2 99 1\n3 1 1\n",
            r"Toy\.txt line 2: field 'item': '99' is not in Toy_item2attributes\.json",
            "unknown_item",
        ),
        (
            "1 3 2\n1 4 1\n3 1 1\n",
            r"Toy\.txt line 2: field 'user': user '1' already had a line",
            "duplicate_user",
        ),
    ],
)
def test_s3rec_bad_lines(tmp_path, text, message, reason):
    source = _s3rec(tmp_path, text)
    with pytest.raises(DataError, match=message):
        get_adapter("s3rec")(source)
    raw = get_adapter("s3rec")({**source, "skip_bad": True})
    assert raw.skipped == {reason: 1}


def test_s3rec_missing_attributes_file(tmp_path):
    (tmp_path / "Toy.txt").write_text("1 2 3\n")
    with pytest.raises(
        FileNotFoundError, match=r"s3rec: expected the item attributes .*Toy_item2attributes\.json"
    ):
        get_adapter("s3rec")({"format": "s3rec", "input": str(tmp_path / "Toy.txt")})


def test_taobao_fields_and_errors(tmp_path):
    path = tmp_path / "UserBehavior.csv"
    path.write_text("1,10,5,pv,1511544070\n1,11,6,buy,1511544071\n2,10,9,cart,1511544072\n")
    raw = get_adapter("taobao")({"format": "taobao", "input": str(path)})
    assert raw.cond_fields == ["category", "behavior"]
    # an item has one category: its first seen one
    assert [(r["item"], r["cond_category"], r["cond_behavior"]) for r in _rows(raw)] == [
        ("10", "5", "pv"),
        ("11", "6", "buy"),
        ("10", "5", "cart"),
    ]
    path.write_text("1,10,5,pv,1511544070\n1,11,6,like,1511544071\n1,12,6,pv\n")
    with pytest.raises(DataError, match=r"UserBehavior\.csv line 3: field 'ts': expected 5 fields"):
        get_adapter("taobao")({"format": "taobao", "input": str(path)})
    path.write_text("1,10,5,pv,1511544070\n1,11,6,like,1511544071\n")
    with pytest.raises(DataError, match=r"UserBehavior\.csv line 2: field 'behavior': 'like' is not one of"):
        get_adapter("taobao")({"format": "taobao", "input": str(path)})
    raw = get_adapter("taobao")({"format": "taobao", "input": str(path), "skip_bad": True})
    assert raw.table.num_rows == 1 and raw.skipped == {"unknown_behavior": 1}


def test_empty_file_and_bad_bytes(tmp_path):
    source = _s3rec(tmp_path, "")
    with pytest.raises(DataError, match=r"Toy\.txt: the file is empty"):
        get_adapter("s3rec")(source)
    (tmp_path / "Toy.txt").write_bytes(b"1 2 3\n2 3 \xff\n")
    with pytest.raises(DataError, match=r"Toy\.txt line 2: not valid utf8 text"):
        get_adapter("s3rec")(source)
    source = _ml100k(tmp_path, "1\t1\t5\t10\n2\t\xff\t3\t5\n")
    (tmp_path / "u.data").write_bytes(b"1\t1\t5\t10\n2\t\xff\t3\t5\n")
    with pytest.raises(DataError, match=r"u\.data line 2: not valid utf8 text") as e:
        get_adapter("movielens-100k")(source)
    again = pickle.loads(pickle.dumps(e.value))  # survives worker processes
    assert (again.line, str(again)) == (2, str(e.value))
