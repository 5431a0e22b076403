"""Specification of training.data: loaders, the leave-last-out split and the padded windows.

Small files are written under pytest's ``tmp_path``; the tests marked ``realdata`` read the
shared datasets (``RECSERVE_DATA_DIR`` or ``../shared/data``) and skip when they are absent.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest

from training.data import (
    PAD,
    Interactions,
    build_sequences,
    left_padded_window,
    load_amazon_sequences,
    load_csv,
    load_movielens_1m,
    load_movielens_100k,
    load_parquet,
)
from training.datasets import load_dataset
from training.errors import DataError, DataFormatError, DataSpecError, TrainingError

from .helpers import internal_ids

GOOD_RATINGS = "1::10::5::100\n1::20::3::200\n2::10::4::150\n"


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as handle:
            handle.write(text.encode(encoding))
    else:
        path.write_bytes(text.encode(encoding))
    return path


def interactions(rows: list[tuple[str, str, int]]) -> Interactions:
    """Interactions from (user, item, timestamp) rows, in the given (file) order."""
    users, items, stamps = zip(*rows, strict=True)
    return Interactions(
        users=np.asarray(users),
        items=np.asarray(items),
        timestamps=np.asarray(stamps, dtype=np.int64),
        source="test",
    )


# --------------------------------------------------------------------------- MovieLens-1M


def test_ml1m_reads_user_item_rating_timestamp_in_file_order(tmp_path):
    write(tmp_path / "ratings.dat", GOOD_RATINGS)

    data = load_movielens_1m(tmp_path)

    assert data.users.tolist() == ["1", "1", "2"]
    assert data.items.tolist() == ["10", "20", "10"]
    assert data.ratings.tolist() == [5.0, 3.0, 4.0]
    assert data.ratings.dtype == np.float32
    assert data.timestamps.tolist() == [100, 200, 150]
    assert data.timestamps.dtype == np.int64
    assert data.skipped == 0
    assert data.metadata is None


@pytest.mark.parametrize("name", ["ratings.dat", "ratings.dat.gz"])
@pytest.mark.parametrize("point_at", ["directory", "file"])
def test_ml1m_accepts_a_directory_or_the_ratings_file_plain_or_gzipped(tmp_path, name, point_at):
    ratings = write(tmp_path / name, GOOD_RATINGS)

    data = load_movielens_1m(tmp_path if point_at == "directory" else ratings)

    assert len(data) == 3
    assert data.items.tolist() == ["10", "20", "10"]
    assert str(ratings) in data.source


def test_ml1m_movies_dat_beside_ratings_gives_latin1_titles_and_genres(tmp_path):
    write(tmp_path / "ratings.dat.gz", GOOD_RATINGS)
    write(
        tmp_path / "movies.dat",
        "10::Amélie (2001)::Comedy|Romance\n20::Toy Story (1995)::Animation|Children's|Comedy\n",
        encoding="latin-1",
    )

    metadata = load_movielens_1m(tmp_path).metadata

    assert metadata.titles == {"10": "Amélie (2001)", "20": "Toy Story (1995)"}
    assert metadata.genres["10"] == ["Comedy", "Romance"]
    assert metadata.genres["20"] == ["Animation", "Children's", "Comedy"]


@pytest.mark.parametrize(
    ("bad_line", "problem"),
    [
        ("1::30::4", "expected 4 fields"),
        ("1::30::4::yesterday", "timestamp 'yesterday'"),
        ("1::::4::300", "empty item id"),
        ("1::30::great::300", "great"),
    ],
    ids=["wrong-field-count", "non-numeric-timestamp", "empty-item", "bad-rating"],
)
def test_malformed_ratings_line_names_file_and_line(tmp_path, bad_line, problem):
    # Line 2 is blank: line numbers count physical lines, blank ones included.
    ratings = write(tmp_path / "ratings.dat", f"1::10::5::100\n\n{bad_line}\n2::10::4::150\n")

    with pytest.raises(DataFormatError) as caught:
        load_movielens_1m(tmp_path)

    message = str(caught.value)
    assert f"{ratings}:3" in message
    assert "ratings.dat:3" in message
    assert problem in message
    assert caught.value.path == str(ratings)
    assert caught.value.line == 3


def test_malformed_line_in_gzipped_ratings_names_file_and_line(tmp_path):
    write(tmp_path / "ratings.dat.gz", "1::10::5::100\n1::20::3\n")

    with pytest.raises(DataFormatError, match=r"ratings\.dat\.gz:2: expected 4 fields"):
        load_movielens_1m(tmp_path)


def test_skip_malformed_skips_bad_ratings_lines_and_counts_them(tmp_path):
    write(
        tmp_path / "ratings.dat",
        "1::10::5::100\n1::30::4\n1::::4::300\n1::20::3::200\nx::y::z::w\n2::10::4::150\n",
    )

    data = load_movielens_1m(tmp_path, skip_malformed=True)

    assert data.skipped == 3
    assert len(data) == 3
    assert data.items.tolist() == ["10", "20", "10"]


def test_ml1m_file_with_only_malformed_lines_is_an_error_even_when_skipping(tmp_path):
    write(tmp_path / "ratings.dat", "1::10::5\n")

    with pytest.raises(DataFormatError, match="no interactions"):
        load_movielens_1m(tmp_path, skip_malformed=True)


def test_malformed_movies_dat_line_names_file_and_line(tmp_path):
    write(tmp_path / "ratings.dat", GOOD_RATINGS)
    write(tmp_path / "movies.dat", "10::Heat (1995)::Action\n20::no genres field\n")

    with pytest.raises(DataFormatError, match=r"movies\.dat:2: expected 3 fields"):
        load_movielens_1m(tmp_path)


def test_ml1m_directory_without_ratings_is_a_spec_error(tmp_path):
    with pytest.raises(DataSpecError, match="ratings"):
        load_movielens_1m(tmp_path)


# --------------------------------------------------------------------------- ml-100k


def u_item_line(item: str, title: str, genres: set[int]) -> str:
    flags = ["1" if g in genres else "0" for g in range(19)]
    return "|".join([item, title, "01-Jan-1995", "", "http://example.org", *flags])


def test_ml100k_reads_tab_separated_u_data(tmp_path):
    write(tmp_path / "u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n")

    data = load_movielens_100k(tmp_path)

    assert data.users.tolist() == ["196", "186"]
    assert data.items.tolist() == ["242", "302"]
    assert data.ratings.tolist() == [3.0, 3.0]
    assert data.timestamps.tolist() == [881250949, 891717742]
    assert data.metadata is None


def test_ml100k_u_item_gives_titles_and_genres_from_the_19_flags(tmp_path):
    data_file = write(tmp_path / "u.data", "1\t1\t5\t100\n1\t2\t4\t200\n")
    # Flags 3, 4, 5 are Animation, Children's, Comedy; 0 is "unknown", 18 is Western.
    write(
        tmp_path / "u.item",
        u_item_line("1", "Toy Story (1995)", {3, 4, 5})
        + "\n"
        + u_item_line("2", "Café (1990)", {0, 18})
        + "\n",
        encoding="latin-1",
    )
    assert len(u_item_line("1", "t", set()).split("|")) == 24

    metadata = load_movielens_100k(data_file).metadata

    assert metadata.titles == {"1": "Toy Story (1995)", "2": "Café (1990)"}
    assert metadata.genres == {
        "1": ["Animation", "Children's", "Comedy"],
        "2": ["unknown", "Western"],
    }


def test_ml100k_malformed_u_data_line_names_file_and_line(tmp_path):
    write(tmp_path / "u.data", "1\t1\t5\t100\n1 2 4 200\n")

    with pytest.raises(DataFormatError, match=r"u\.data:2: expected 4 fields"):
        load_movielens_100k(tmp_path)


def test_ml100k_u_item_with_wrong_field_count_names_file_and_line(tmp_path):
    write(tmp_path / "u.data", "1\t1\t5\t100\n")
    write(tmp_path / "u.item", "1|Toy Story (1995)|01-Jan-1995\n")

    with pytest.raises(DataFormatError, match=r"u\.item:1: expected 24 fields, got 3"):
        load_movielens_100k(tmp_path)


# --------------------------------------------------------------------------- Amazon sequences


def write_amazon(directory: Path, items: str, times: str, suffix: str = "") -> tuple[Path, Path]:
    return (
        write(directory / f"Beauty_item.txt{suffix}", items),
        write(directory / f"Beauty_time.txt{suffix}", times),
    )


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_amazon_reads_aligned_item_and_timestamp_lines(tmp_path, suffix):
    items, times = write_amazon(tmp_path, "1 7 8 9\n2 8\n", "1 100 200 300\n2 150\n", suffix=suffix)

    data = load_amazon_sequences(items, times)

    assert data.users.tolist() == ["1", "1", "1", "2"]
    assert data.items.tolist() == ["7", "8", "9", "8"]
    assert data.timestamps.tolist() == [100, 200, 300, 150]
    assert data.ratings is None


def test_amazon_user_mismatch_names_both_files_and_lines(tmp_path):
    items, times = write_amazon(tmp_path, "1 7 8\n2 8 9\n", "1 100 200\n3 150 160\n")

    with pytest.raises(DataFormatError) as caught:
        load_amazon_sequences(items, times)

    message = str(caught.value)
    assert f"{items}:2" in message
    assert f"{times}:2" in message
    assert "user '2' does not match user '3'" in message


def test_amazon_different_item_and_timestamp_counts_on_a_line_names_line(tmp_path):
    items, times = write_amazon(tmp_path, "1 7 8\n2 8 9 10\n", "1 100 200\n2 150 160\n")

    with pytest.raises(DataFormatError) as caught:
        load_amazon_sequences(items, times)

    message = str(caught.value)
    assert f"{items}:2" in message
    assert "3 items but 2 timestamps" in message


def test_amazon_skip_malformed_skips_mismatched_lines(tmp_path):
    items, times = write_amazon(tmp_path, "1 7 8\n2 8 9 10\n3 7\n", "1 100 200\n2 150 160\n3 50\n")

    data = load_amazon_sequences(items, times, skip_malformed=True)

    assert data.skipped == 1
    assert data.users.tolist() == ["1", "1", "3"]


@pytest.mark.parametrize("longer", ["items", "times"])
def test_amazon_files_with_different_line_counts_name_the_longer_file_and_line(tmp_path, longer):
    short, long = "1 7 8\n2 8\n", "1 7 8\n2 8\n3 9\n"
    short_t, long_t = "1 100 200\n2 150\n", "1 100 200\n2 150\n3 50\n"
    items, times = write_amazon(
        tmp_path,
        long if longer == "items" else short,
        long_t if longer == "times" else short_t,
    )

    with pytest.raises(DataFormatError, match="different line counts") as caught:
        load_amazon_sequences(items, times)

    extra = items if longer == "items" else times
    assert f"{extra}:3" in str(caught.value)


def test_load_dataset_amazon_directory_finds_item_and_time_files(tmp_path):
    write_amazon(tmp_path, "1 7 8\n2 8\n", "1 100 200\n2 150\n", suffix=".gz")

    data = load_dataset(f"amazon:{tmp_path}")

    assert len(data) == 3
    assert data.source.startswith("amazon:")


def test_load_dataset_amazon_accepts_items_comma_times(tmp_path):
    items, times = write_amazon(tmp_path, "1 7 8\n", "1 100 200\n")

    assert len(load_dataset(f"amazon:{items},{times}")) == 2


def test_load_dataset_amazon_directory_without_the_pair_is_a_spec_error(tmp_path):
    write(tmp_path / "Beauty_item.txt", "1 7 8\n")

    with pytest.raises(DataSpecError, match="_time.txt"):
        load_dataset(f"amazon:{tmp_path}")


# --------------------------------------------------------------------------- CSV


def test_csv_with_rating_column_reads_all_four_columns(tmp_path):
    path = write(tmp_path / "log.csv", "user,item,timestamp,rating\nu1,i1,100,4.5\nu2,i2,50,1\n")

    data = load_csv(path)

    assert data.users.tolist() == ["u1", "u2"]
    assert data.items.tolist() == ["i1", "i2"]
    assert data.timestamps.tolist() == [100, 50]
    assert data.ratings.tolist() == [4.5, 1.0]


def test_csv_columns_may_come_in_any_order_and_rating_is_optional(tmp_path):
    path = write(tmp_path / "log.csv", " Timestamp ,Item,USER\n100,i1,u1\n")

    data = load_csv(path)

    assert (data.users.tolist(), data.items.tolist(), data.timestamps.tolist()) == (
        ["u1"],
        ["i1"],
        [100],
    )
    assert data.ratings is None


def test_csv_accepts_iso8601_timestamps_as_utc_seconds(tmp_path):
    path = write(
        tmp_path / "log.csv",
        "user,item,timestamp\n"
        "u1,i1,2020-01-01T00:00:00Z\n"
        "u1,i2,2020-01-01T01:00:05+01:00\n"
        "u1,i3,2020-01-01 00:00:10\n"
        "u1,i4,1577836815.9\n",
    )

    data = load_csv(path)

    assert data.timestamps.tolist() == [1577836800, 1577836805, 1577836810, 1577836815]


def test_csv_missing_column_error_names_the_column(tmp_path):
    path = write(tmp_path / "log.csv", "user,item,time\nu1,i1,100\n")

    with pytest.raises(DataFormatError) as caught:
        load_csv(path)

    assert f"{path}:1" in str(caught.value)
    assert "missing column(s) timestamp" in str(caught.value)


def test_csv_wrong_field_count_names_the_line(tmp_path):
    path = write(tmp_path / "log.csv", "user,item,timestamp\nu1,i1,100\nu1,i2,200,extra\n")

    with pytest.raises(DataFormatError, match=r"log\.csv:3: expected 3 fields, got 4"):
        load_csv(path)


def test_csv_bad_timestamp_names_the_line(tmp_path):
    path = write(tmp_path / "log.csv", "user,item,timestamp\nu1,i1,100\nu1,i2,soon\n")

    with pytest.raises(DataFormatError, match=r"log\.csv:3: timestamp 'soon'"):
        load_csv(path)


def test_tsv_is_sniffed(tmp_path):
    path = write(tmp_path / "log.tsv", "user\titem\ttimestamp\nu1\ti,1\t100\nu2\ti2\t200\n")

    data = load_csv(path)

    assert data.items.tolist() == ["i,1", "i2"]
    assert data.timestamps.tolist() == [100, 200]


def test_tsv_with_malformed_lines_near_the_top_still_reports_them_by_line(tmp_path):
    # Two bad lines out of a handful defeat the sniffer's consistency check on the sample.
    path = write(
        tmp_path / "log.tsv",
        "user\titem\ttimestamp\nu1\ti1\t1\nu1\ti2\t2\tx\nu2\ti1\t3\tx\nu2\ti3\t4\n",
    )

    with pytest.raises(DataFormatError, match=r"log\.tsv:3: expected 3 fields, got 4"):
        load_csv(path)
    data = load_csv(path, skip_malformed=True)
    assert data.skipped == 2
    assert data.items.tolist() == ["i1", "i3"]


def test_csv_that_is_not_utf8_is_a_format_error(tmp_path):
    path = tmp_path / "log.csv"
    path.write_bytes(b"user,item,timestamp\nu1,caf\xe9,100\n")

    with pytest.raises(DataFormatError, match="not valid utf-8"):
        load_csv(path)


def test_empty_csv_is_a_format_error(tmp_path):
    path = write(tmp_path / "log.csv", "")

    with pytest.raises(DataFormatError, match="empty file"):
        load_csv(path)


# --------------------------------------------------------------------------- Parquet


def write_parquet(path: Path, columns: dict) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table(columns), path)
    return path


def test_parquet_reads_user_item_timestamp_and_rating(tmp_path):
    path = write_parquet(
        tmp_path / "log.parquet",
        {"user": ["u1", "u2"], "item": [7, 8], "timestamp": [100, 200], "rating": [4.0, 2.5]},
    )

    data = load_parquet(path)

    assert data.users.tolist() == ["u1", "u2"]
    assert data.items.tolist() == [7, 8]
    assert data.timestamps.tolist() == [100, 200]
    assert data.ratings.tolist() == [4.0, 2.5]
    assert data.skipped == 0


def test_parquet_null_raises_naming_column_and_row(tmp_path):
    path = write_parquet(
        tmp_path / "log.parquet",
        {"user": ["u1", "u2", "u3"], "item": ["a", "b", None], "timestamp": [1, 2, 3]},
    )

    with pytest.raises(DataFormatError) as caught:
        load_parquet(path)

    message = str(caught.value)
    assert str(path) in message
    assert "row 3" in message
    assert "column item" in message


def test_parquet_skip_malformed_drops_null_rows_and_reports_the_count(tmp_path):
    path = write_parquet(
        tmp_path / "log.parquet",
        {"user": [1, 2, None, 4], "item": [10, 20, 30, None], "timestamp": [1, 2, 3, 4]},
    )

    data = load_parquet(path, skip_malformed=True)

    assert data.skipped == 2
    assert data.timestamps.tolist() == [1, 2]
    # Dropping rows must not turn the integer ids of the others into floats ("1.0").
    sequences = build_sequences(data)
    assert sequences.user_map.raw[1:].tolist() == ["1", "2"]
    assert sequences.item_map.raw[1:].tolist() == ["10", "20"]


def test_parquet_missing_column_names_the_column(tmp_path):
    path = write_parquet(tmp_path / "log.parquet", {"user": ["u1"], "item": ["a"], "ts": [1]})

    with pytest.raises(DataFormatError, match="missing column.*timestamp"):
        load_parquet(path)


def test_parquet_string_timestamps_are_a_format_error(tmp_path):
    path = write_parquet(
        tmp_path / "log.parquet", {"user": ["u1"], "item": ["a"], "timestamp": ["yesterday"]}
    )

    with pytest.raises(DataFormatError, match="column timestamp has type"):
        load_parquet(path)


def test_non_parquet_file_is_a_format_error(tmp_path):
    path = write(tmp_path / "log.parquet", "user,item,timestamp\nu1,i1,1\n")

    with pytest.raises(DataFormatError, match="not a readable Parquet file") as caught:
        load_parquet(path)
    assert str(path) in str(caught.value)


# --------------------------------------------------------------------------- load_dataset


def test_unknown_data_kind_is_a_spec_error(tmp_path):
    with pytest.raises(DataSpecError, match="unknown data kind 'movies'"):
        load_dataset(f"movies:{tmp_path}")


@pytest.mark.parametrize("spec", ["ml-1m", "ml-100k:", "csv", "parquet:", "amazon"])
def test_data_spec_without_a_path_is_a_spec_error(spec):
    with pytest.raises(DataSpecError, match="needs a path"):
        load_dataset(spec)


@pytest.mark.parametrize(
    "spec",
    [
        "ml-1m:{missing}",
        "ml-100k:{missing}",
        "amazon:{missing}",
        "amazon:{missing}/a_item.txt,{missing}/a_time.txt",
        "csv:{missing}/log.csv",
        "parquet:{missing}/log.parquet",
    ],
)
def test_data_spec_with_a_nonexistent_path_is_a_spec_error(tmp_path, spec):
    with pytest.raises(DataSpecError):
        load_dataset(spec.format(missing=tmp_path / "nowhere"))


def test_load_dataset_dispatches_to_the_loader_of_each_kind(tmp_path):
    write(tmp_path / "ml1m" / "ratings.dat", GOOD_RATINGS)
    write(tmp_path / "ml100k" / "u.data", "1\t1\t5\t100\n")
    write(tmp_path / "log.csv", "user,item,timestamp\nu1,i1,1\nu1,i2,2\n")

    assert len(load_dataset(f"ml-1m:{tmp_path / 'ml1m'}")) == 3
    assert len(load_dataset(f"ML-100K:{tmp_path / 'ml100k'}")) == 1
    assert len(load_dataset(f"csv:{tmp_path / 'log.csv'}")) == 2


def test_synthetic_spec_generates_the_requested_sizes():
    data = load_dataset("synthetic:users=50,items=30")

    sequences = build_sequences(data)
    assert sequences.n_users == 50
    assert 0 < sequences.n_items <= 30
    assert isinstance(data, Interactions)


@pytest.mark.parametrize(
    "spec", ["synthetic:colour=3", "synthetic:users=many", "synthetic:users", "synthetic:users=0"]
)
def test_bad_synthetic_option_is_a_spec_error(spec):
    with pytest.raises(DataSpecError):
        load_dataset(spec)


def test_spec_and_format_errors_are_both_data_errors():
    assert issubclass(DataSpecError, DataError)
    assert issubclass(DataFormatError, DataError)
    assert issubclass(DataError, TrainingError)


# --------------------------------------------------------------------------- build_sequences

# File order matters for the tie: a's events at t=30 are x (row 0) and then z (row 3).
ROWS = [
    ("a", "x", 30),
    ("b", "y", 5),
    ("a", "y", 10),
    ("a", "z", 30),
    ("a", "w", 20),
    ("b", "x", 7),
    ("c", "z", 1),
]


def test_build_sequences_sorts_each_users_events_by_time_keeping_ties_in_file_order():
    data = build_sequences(interactions(ROWS))

    assert data.user_map.raw[1:].tolist() == ["a", "b", "c"]
    assert data.offsets.tolist() == [0, 4, 6, 7]
    raw_items = data.item_map.raw[data.items].tolist()
    assert raw_items == ["y", "w", "x", "z", "y", "x", "z"]
    assert data.timestamps.tolist() == [10, 20, 30, 30, 5, 7, 1]


def test_build_sequences_keeps_ratings_aligned_with_their_events():
    raw = interactions(ROWS)
    raw.ratings = np.arange(len(ROWS), dtype=np.float32)  # rating == file row

    data = build_sequences(raw)

    assert data.ratings.tolist() == [2, 4, 0, 3, 1, 5, 6]


def test_item_map_reserves_internal_id_0_for_padding_and_numbers_items_from_1():
    data = build_sequences(interactions(ROWS))

    assert PAD == 0
    assert data.item_map.raw[PAD] == ""
    assert data.item_map.raw[1:].tolist() == ["w", "x", "y", "z"]
    assert data.n_items == len(data.item_map) == 4
    assert internal_ids(data.item_map) == {"w": 1, "x": 2, "y": 3, "z": 4}
    assert data.items.min() == 1
    assert data.items.max() == data.n_items


def test_valid_target_is_the_second_last_event_and_test_target_the_last():
    data = build_sequences(interactions(ROWS))
    lookup = internal_ids(data.item_map)

    users, history_end, targets = data.eval_examples("valid")
    assert users.tolist() == [0]  # only "a" has three or more events
    assert history_end.tolist() == [2]
    assert targets.tolist() == [lookup["x"]]

    users, history_end, targets = data.eval_examples("test")
    assert users.tolist() == [0]
    assert history_end.tolist() == [3]
    assert targets.tolist() == [lookup["z"]]

    with pytest.raises(ValueError, match="split"):
        data.eval_examples("train")


def test_users_with_fewer_than_three_events_are_not_evaluated_and_train_on_everything():
    data = build_sequences(interactions(ROWS))

    assert data.eval_users().tolist() == [0]
    # a trains on its first two events; b (two events) and c (one event) on all of theirs.
    assert data.train_end().tolist() == [2, 6, 7]


def test_train_item_counts_count_only_training_events():
    data = build_sequences(interactions(ROWS))
    lookup = internal_ids(data.item_map)

    counts = data.train_item_counts()

    # Training events: a -> y, w; b -> y, x; c -> z. a's x (valid) and z (test) are held out.
    expected = np.zeros(data.n_items + 1, dtype=np.int64)
    for item, count in {"w": 1, "x": 1, "y": 2, "z": 1}.items():
        expected[lookup[item]] = count
    assert counts.tolist() == expected.tolist()
    assert counts[PAD] == 0


def test_training_events_are_all_but_evaluated_users_last_two_in_event_order():
    data = build_sequences(interactions(ROWS))

    # Per user by time: a -> y, w, x (valid), z (test); b -> y, x; c -> z.
    assert data.train_mask().tolist() == [True, True, False, False, True, True, True]
    items, timestamps = data.training_events()
    assert data.item_map.raw[items].tolist() == ["y", "w", "y", "x", "z"]
    assert timestamps.tolist() == [10, 20, 5, 7, 1]


def test_summary_reports_counts_and_ranges():
    summary = build_sequences(interactions(ROWS)).summary()

    assert summary["users"] == 3
    assert summary["items"] == 4
    assert summary["interactions"] == 7
    assert summary["eval_users"] == 1
    assert summary["max_length"] == 4
    assert (summary["first_timestamp"], summary["last_timestamp"]) == (1, 30)
    assert summary["has_ratings"] is False


# --------------------------------------------------------------------------- windows

WINDOW_ITEMS = np.array([11, 12, 13, 14, 15, 16, 17], dtype=np.int64)
WINDOW_TIMES = np.array([100, 110, 130, 160, 200, 1000, 1005], dtype=np.int64)


def test_left_padded_window_keeps_the_last_max_len_events_and_pads_on_the_left():
    # Ranges: five events [0, 5) (truncated to 3), two events [5, 7), one event [3, 4).
    item_ids, deltas = left_padded_window(
        WINDOW_ITEMS, WINDOW_TIMES, np.array([0, 5, 3]), np.array([5, 7, 4]), max_len=3
    )

    assert item_ids.dtype == np.int64
    assert deltas.dtype == np.float32
    assert item_ids.tolist() == [
        [13, 14, 15],
        [0, 16, 17],
        [0, 0, 14],
    ]
    assert deltas.tolist() == [
        [20, 30, 40],  # 13's delta comes from 12, the event before the window
        [0, 0, 5],  # padding, then the range's first event
        [0, 0, 0],  # 14 is its range's first event although 13 precedes it in the array
    ]


def test_left_padded_window_is_as_wide_as_the_longest_range_when_max_len_is_larger():
    item_ids, deltas = left_padded_window(
        WINDOW_ITEMS, WINDOW_TIMES, np.array([0, 5]), np.array([4, 7]), max_len=50
    )

    assert item_ids.tolist() == [[11, 12, 13, 14], [0, 0, 16, 17]]
    assert deltas.tolist() == [[0, 10, 20, 30], [0, 0, 0, 5]]


# --------------------------------------------------------------------------- leakage


def leakage_data() -> tuple:
    """Users whose valid and test items are unique to them and appear nowhere else."""
    rng = np.random.default_rng(7)
    rows = []
    for user in range(23):
        length = int(rng.integers(1, 12))
        common = rng.choice([f"c{k}" for k in range(15)], size=length)
        stamps = np.sort(rng.integers(0, 1000, size=length))
        rows += [(f"u{user}", item, int(t)) for item, t in zip(common, stamps, strict=True)]
        if length >= 2:  # with the two held-out events this user is evaluated
            rows += [(f"u{user}", f"valid{user}", 2000), (f"u{user}", f"test{user}", 2000)]
    rng.shuffle(rows)  # file order must not matter beyond ties (valid before test here)
    rows.sort(key=lambda row: row[2] == 2000 and row[1].startswith("test"))
    return build_sequences(interactions(rows))


@pytest.mark.parametrize("windows", ["last", "crop", "sliding"])
@pytest.mark.parametrize("max_len", [3, 50])
def test_training_batches_never_contain_valid_or_test_items(max_len, windows):
    torch = pytest.importorskip("torch")
    from training.trainer import batches, epoch_windows, training_windows

    data = leakage_data()
    lookup = internal_ids(data.item_map)
    held_out = {i for raw, i in lookup.items() if raw.startswith(("valid", "test"))}
    _, _, valid_targets = data.eval_examples("valid")
    _, _, test_targets = data.eval_examples("test")
    assert set(valid_targets.tolist()) | set(test_targets.tolist()) == held_out
    assert len(held_out) >= 20

    starts, ends = training_windows(data)
    rng = np.random.default_rng(0)
    seen_inputs, seen_targets, n_targets = set(), set(), 0
    for _ in range(5):  # crop draws new windows each epoch
        chosen = epoch_windows(data, windows, max_len, rng)
        for inputs, deltas, targets in batches(
            data,
            chosen.starts,
            chosen.ends,
            max_len,
            batch_size=4,
            rng=rng,
            first_targets=chosen.first_targets,
        ):
            assert inputs.shape == deltas.shape == targets.shape
            assert inputs.dtype == targets.dtype == torch.int64
            seen_inputs |= set(inputs.unique().tolist())
            seen_targets |= set(targets.unique().tolist())
            n_targets += int((targets > 0).sum())

    assert not held_out & seen_inputs
    assert not held_out & seen_targets
    if max_len >= data.lengths.max() or windows == "sliding":
        # Untruncated, or sliding, every training transition is a target once per epoch.
        assert n_targets == 5 * int((ends - starts - 1).sum())
    assert seen_targets - {PAD}  # the batches did train on something


# --------------------------------------------------------------------------- real data


def real_data_dir() -> Path:
    default = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    return Path(os.environ.get("RECSERVE_DATA_DIR") or default)


def real_dataset(name: str) -> Path:
    path = real_data_dir() / name
    if not path.is_dir():
        pytest.skip(f"real data not found at {path}; set RECSERVE_DATA_DIR")
    return path


@pytest.fixture(scope="module")
def ml1m():
    path = real_dataset("ml-1m")
    data = load_dataset(f"ml-1m:{path}")
    return data, build_sequences(data)


@pytest.mark.realdata
def test_real_ml100k_has_100k_interactions_943_users_1682_items_and_titles():
    data = load_dataset(f"ml-100k:{real_dataset('ml-100k')}")
    sequences = build_sequences(data)

    assert (len(data), sequences.n_users, sequences.n_items) == (100_000, 943, 1_682)
    assert data.skipped == 0
    assert data.metadata.titles["1"] == "Toy Story (1995)"
    assert len(data.metadata.titles) == 1_682


@pytest.mark.realdata
def test_real_amazon_beauty_has_198502_interactions_22363_users_12101_items():
    data = load_dataset(f"amazon:{real_dataset('amazon-beauty-5core-seq')}")
    sequences = build_sequences(data)

    assert (len(data), sequences.n_users, sequences.n_items) == (198_502, 22_363, 12_101)
    assert data.skipped == 0
    assert data.metadata is None


@pytest.mark.realdata
def test_real_ml1m_has_1000209_interactions_6040_users_3706_items(ml1m):
    data, sequences = ml1m

    assert (len(data), sequences.n_users, sequences.n_items) == (1_000_209, 6_040, 3_706)
    assert data.skipped == 0
    assert "Animation" in data.metadata.genres["1"]
    assert len(sequences.eval_users()) == 6_040  # every ml-1m user has at least 20 ratings


@pytest.mark.realdata
def test_real_ml1m_events_are_chronological_within_each_user(ml1m):
    _, sequences = ml1m

    same_user = np.ones(len(sequences.items) - 1, dtype=bool)
    same_user[sequences.offsets[1:-1] - 1] = False
    assert np.all(np.diff(sequences.timestamps)[same_user] >= 0)
