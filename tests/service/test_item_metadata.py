"""The item-metadata featurizer that the export and the service share."""

from __future__ import annotations

import numpy as np
import pytest

from service.errors import InvalidField, InvalidMetadata
from service.item_metadata import MetadataVocabulary, parse_metadata

CATALOGUE = [
    {"title": "Toy Story (1995)", "genres": ["Animation", "Children's", "Comedy"]},
    {"title": "Toy Story 2 (1999)", "genres": ["Animation", "Children's", "Comedy"]},
    {"title": "Heat (1995)", "genres": ["Action", "Crime", "Thriller"]},
    {"title": "Casino (1995)", "genres": ["Drama", "Thriller"]},
    {"title": "Metropolis (1927)", "genres": ["Sci-Fi"]},
]


def tokens_of(vocabulary: MetadataVocabulary, record: dict) -> dict[str, float]:
    """An item's featurized tokens by name, with their weights."""
    ids, weights = vocabulary.featurize([record])
    return {
        vocabulary.tokens[i]: float(w) for i, w in zip(ids[0], weights[0], strict=True) if w > 0
    }


@pytest.fixture(scope="module")
def vocabulary() -> MetadataVocabulary:
    return MetadataVocabulary.fit(CATALOGUE, min_count=2)


def test_a_movielens_title_gives_its_words_and_year(vocabulary):
    fields = parse_metadata({"title": "Godfather: Part II, The (1974)", "genres": [" Drama "]})
    assert fields.words == ("godfather", "part", "ii", "the")
    assert fields.year == 1974 and fields.genres == ("drama",)
    assert parse_metadata({"title": "Heat (1995)", "year": 2001}).year == 2001  # year wins


def test_every_field_weighs_one_whatever_its_length(vocabulary):
    tokens = tokens_of(vocabulary, CATALOGUE[0])
    by_field: dict[str, float] = {}
    for name, weight in tokens.items():
        field = name.split("=")[0]
        field = "year" if field in ("decade", "half_decade") else field
        by_field[field] = by_field.get(field, 0.0) + weight
    assert by_field == pytest.approx({"genre": 1.0, "title": 1.0, "year": 1.0})
    assert {"genre=animation", "title=toy", "title=story", "decade=1990"} <= set(tokens)


def test_unknown_words_and_genres_become_their_fields_unknown_token(vocabulary):
    # "metropolis" and "sci-fi" occur in one item only, below min_count: unknown at fit too.
    tokens = tokens_of(vocabulary, {"title": "Zyzzyva Story", "genres": ["Polka", "Comedy"]})
    assert tokens == pytest.approx(
        {
            "genre=<unk>": 0.5,
            "genre=comedy": 0.5,
            "title=<unk>": 0.5,
            "title=story": 0.5,
            "year=<none>": 1.0,
        }
    )
    assert "title=metropolis" not in vocabulary.tokens and "genre=sci-fi" not in vocabulary.tokens


def test_an_item_without_metadata_gets_each_fields_none_token(vocabulary):
    assert tokens_of(vocabulary, {}) == {
        "genre=<none>": 1.0,
        "title=<none>": 1.0,
        "year=<none>": 1.0,
    }
    assert tokens_of(vocabulary, {"title": None, "genres": []}) == tokens_of(vocabulary, {})


def test_a_year_outside_the_fitted_range_counts_as_the_nearest_known_year(vocabulary):
    assert vocabulary.years == (1927, 1999)
    newest = tokens_of(vocabulary, {"year": 2024})
    assert {"decade=1990", "half_decade=1995"} <= set(newest)
    oldest = tokens_of(vocabulary, {"year": 1890})
    assert {"decade=1920", "half_decade=1925"} <= set(oldest)


def test_featurizing_is_deterministic_and_survives_the_json_file(vocabulary, tmp_path):
    path = tmp_path / "vocabulary.json"
    path.write_text(vocabulary.to_json())
    again = MetadataVocabulary.read(path)
    assert again == vocabulary
    refit = MetadataVocabulary.fit(list(CATALOGUE), min_count=2)
    for other in (again, refit):
        for mine, theirs in zip(
            vocabulary.featurize(CATALOGUE), other.featurize(CATALOGUE), strict=True
        ):
            np.testing.assert_array_equal(mine, theirs)
    ids, weights = vocabulary.featurize(CATALOGUE)
    assert ids.dtype == np.int64 and weights.dtype == np.float32
    assert ids.shape == weights.shape and ids.shape[0] == len(CATALOGUE)
    assert np.all((ids == 0) == (weights == 0))  # padding is id 0 with weight 0


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"genres": "Comedy|Drama"}, r"metadata\[1\]\.genres: expected a list of strings, got str"),
        ({"genres": ["Comedy", 3]}, r"metadata\[1\]\.genres\[1\]: expected a string, got int"),
        ({"title": 12}, r"metadata\[1\]\.title: expected a string, got int"),
        ({"year": "1995"}, r"metadata\[1\]\.year: expected an integer, got '1995'"),
        ({"year": True}, r"metadata\[1\]\.year: expected an integer"),
        ({"genre": ["Comedy"]}, r"metadata\[1\]\.genre: not an item metadata field \(known:"),
        (["Comedy"], r"metadata\[1\]: expected an object with title, genres, year; got list"),
    ],
)
def test_bad_metadata_is_refused_naming_the_item_and_the_field(vocabulary, record, message):
    with pytest.raises(InvalidMetadata, match=message) as caught:
        vocabulary.featurize([CATALOGUE[0], record])
    assert isinstance(caught.value, InvalidField)  # a 422 where a request carries it


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ('{"format": 2, "tokens": []}', "not a vocabulary of format 1"),
        ('{"format": 1, "tokens": ["a", "<pad>"], "max_per_field": 4}', "must start with <pad>"),
        ('{"format": 1, "tokens": ["<pad>"], "max_per_field": 4}', "lacks one of"),
    ],
)
def test_a_damaged_vocabulary_file_is_refused(tmp_path, document, problem):
    path = tmp_path / "vocabulary.json"
    path.write_text(document)
    with pytest.raises(ValueError, match=problem):
        MetadataVocabulary.read(path)
