"""Item metadata as the metadata encoder's inputs: the one featurizer export and service share.

A retriever's ``metadata_encoder.onnx`` maps an item's metadata into that retriever's item
space, so an item the models never saw can still be retrieved (cold start). The export
(``training.cold_start``) fits it and the service runs it with onnxruntime; both turn
metadata into the graph's inputs here, so an item gets the same vector wherever it is
embedded. numpy and the standard library only: the service never imports torch.

An item's metadata is a mapping with these optional keys (any other key is refused, so a
misspelt field cannot silently drop out):

=========  =========================================================================
title      a string; its words become tokens, and a trailing ``(1995)`` (as MovieLens
           writes titles) is read as the year
genres     a list of strings (genres, categories, tags)
year       an integer that overrides the year read from the title
=========  =========================================================================

Featurization: each field gives tokens (``genre=comedy``, ``title=story``,
``decade=1990``, ``half_decade=1995``), looked up in a :class:`MetadataVocabulary` (written
into the bundle as JSON, see ``VOCABULARY``). A word or genre the vocabulary lacks becomes
its field's ``<unk>`` token; a field that is absent or empty becomes its ``<none>`` token;
a year outside the fitted range counts as the nearest year inside it (a film newer than
the catalogue is "the newest era", not "unknown"). Within a field the weights are equal and
sum to one, so every field weighs the same whatever its length. The graph's inputs are
``token_ids`` int64 (B, T) and ``token_weights`` float32 (B, T), padded with id 0 and
weight 0; its output is ``item_embedding`` float32 (B, D).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.devices import onnx_session
from service.errors import InvalidMetadata, excerpt

VOCABULARY = "item_metadata_vocabulary.json"
VOCABULARY_FORMAT = 1
INPUT_NAMES = ("token_ids", "token_weights")
OUTPUT_NAME = "item_embedding"

METADATA_KEYS = ("title", "genres", "year")
PAD_TOKEN = "<pad>"
NONE, UNKNOWN = "<none>", "<unk>"
YEAR_IN_TITLE = re.compile(r"\((\d{4})\)\s*$")
WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class ItemFields:
    """One item's metadata, checked: normalised genres and title words, and its year."""

    genres: tuple[str, ...]
    words: tuple[str, ...]
    year: int | None


def parse_metadata(record: object, where: str = "metadata") -> ItemFields:
    """Check one item's metadata (``where`` names it in errors, e.g. ``metadata[3]``) and
    split it into fields. ``InvalidMetadata`` names the field that is wrong."""
    if not isinstance(record, Mapping):
        raise InvalidMetadata(
            f"{where}: expected an object with {', '.join(METADATA_KEYS)}; "
            f"got {type(record).__name__}"
        )
    for key in record:
        if key not in METADATA_KEYS:
            raise InvalidMetadata(
                f"{where}.{excerpt(key, 40, quote=False)}: not an item metadata field "
                f"(known: {', '.join(METADATA_KEYS)})"
            )
    title = record.get("title")
    if title is not None and not isinstance(title, str):
        raise InvalidMetadata(f"{where}.title: expected a string, got {type(title).__name__}")
    genres = record.get("genres")
    if genres is None:
        genres = ()
    elif isinstance(genres, (str, bytes)) or not isinstance(genres, Sequence):
        raise InvalidMetadata(
            f"{where}.genres: expected a list of strings, got {type(genres).__name__}"
        )
    for position, genre in enumerate(genres):
        if not isinstance(genre, str):
            raise InvalidMetadata(
                f"{where}.genres[{position}]: expected a string, got {type(genre).__name__}"
            )
    year = record.get("year")
    if year is not None and (isinstance(year, bool) or not isinstance(year, int)):
        raise InvalidMetadata(f"{where}.year: expected an integer, got {excerpt(year, 40)}")
    words: tuple[str, ...] = ()
    if title is not None:
        found = YEAR_IN_TITLE.search(title)
        if found and year is None:
            year = int(found.group(1))
        words = tuple(WORD.findall((title[: found.start()] if found else title).casefold()))
    normalised = (g.strip().casefold() for g in genres)
    return ItemFields(tuple(dict.fromkeys(g for g in normalised if g)), words, year)


@dataclass(frozen=True)
class MetadataVocabulary:
    """Token strings by id (0 = padding) and the fitted year range; written as JSON.

    ``max_per_field`` bounds the tokens one field contributes (a long title keeps its
    first words), so the inputs stay narrow whatever the metadata.
    """

    tokens: tuple[str, ...]
    years: tuple[int, int] | None  # first and last year seen at fit time
    max_per_field: int = 16

    def __post_init__(self) -> None:
        object.__setattr__(self, "_ids", {token: i for i, token in enumerate(self.tokens)})

    @property
    def size(self) -> int:
        """Tokens, padding included: the encoder's embedding table has this many rows."""
        return len(self.tokens)

    @classmethod
    def fit(
        cls,
        records: Iterable[object],
        *,
        min_count: int = 2,
        max_words: int = 20_000,
        max_per_field: int = 16,
    ) -> MetadataVocabulary:
        """The vocabulary of ``records``: genres and title words found in at least
        ``min_count`` items (the rest map to their field's ``<unk>``, which training then
        learns from rare words), at most ``max_words`` words, most frequent first."""
        genres: Counter[str] = Counter()
        words: Counter[str] = Counter()
        years = []
        for row, record in enumerate(records):
            fields = parse_metadata(record, f"metadata[{row}]")
            genres.update(set(fields.genres[:max_per_field]))
            words.update(set(fields.words[:max_per_field]))
            if fields.year is not None:
                years.append(fields.year)
        tokens = [PAD_TOKEN]
        for field in ("genre", "title", "year"):
            tokens += [f"{field}={NONE}", f"{field}={UNKNOWN}"]
        tokens += [f"genre={g}" for g in sorted(g for g, n in genres.items() if n >= min_count)]
        frequent = sorted(
            (w for w, n in words.items() if n >= min_count), key=lambda w: (-words[w], w)
        )
        tokens += [f"title={w}" for w in frequent[:max_words]]
        year_range = (min(years), max(years)) if years else None
        if year_range:
            first, last = year_range
            tokens += [f"decade={d}" for d in range(first - first % 10, last + 1, 10)]
            tokens += [f"half_decade={h}" for h in range(first - first % 5, last + 1, 5)]
        return cls(tuple(tokens), year_range, max_per_field)

    def item_tokens(self, fields: ItemFields) -> list[tuple[int, float]]:
        """(token id, weight) pairs of one item: each field's weights sum to one."""
        pairs: list[tuple[int, float]] = []
        for field, tokens in (
            ("genre", [f"genre={g}" for g in fields.genres]),
            ("title", [f"title={w}" for w in fields.words]),
            ("year", self._year_tokens(fields.year)),
        ):
            tokens = tokens[: self.max_per_field]
            if not tokens:
                tokens = [f"{field}={NONE}"]
            unknown = self._ids[f"{field}={UNKNOWN}"]
            ids = [self._ids.get(token, unknown) for token in tokens]
            pairs += [(i, 1.0 / len(ids)) for i in ids]
        return pairs

    def _year_tokens(self, year: int | None) -> list[str]:
        if year is None or self.years is None:
            return []
        year = min(max(year, self.years[0]), self.years[1])
        return [f"decade={year - year % 10}", f"half_decade={year - year % 5}"]

    def featurize(self, records: Sequence[object]) -> tuple[np.ndarray, np.ndarray]:
        """The graph's inputs for ``records``: ``token_ids`` int64 (B, T) and
        ``token_weights`` float32 (B, T), right-padded with id 0 and weight 0."""
        rows = [
            self.item_tokens(parse_metadata(record, f"metadata[{i}]"))
            for i, record in enumerate(records)
        ]
        width = max((len(row) for row in rows), default=1)
        ids = np.zeros((len(rows), width), dtype=np.int64)
        weights = np.zeros((len(rows), width), dtype=np.float32)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = [token for token, _ in row]
            weights[i, : len(row)] = [weight for _, weight in row]
        return ids, weights

    def to_json(self) -> str:
        """The bundle's ``VOCABULARY`` file, which :meth:`read` reads back."""
        return json.dumps(
            {
                "format": VOCABULARY_FORMAT,
                "tokens": list(self.tokens),
                "years": list(self.years) if self.years else None,
                "max_per_field": self.max_per_field,
            },
            indent=1,
        )

    @classmethod
    def read(cls, path: str | Path) -> MetadataVocabulary:
        """The vocabulary written by :meth:`to_json`; ValueError naming what is wrong."""
        document = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(document, dict) or document.get("format") != VOCABULARY_FORMAT:
            raise ValueError(f"not a vocabulary of format {VOCABULARY_FORMAT}")
        tokens, years = document.get("tokens"), document.get("years")
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise ValueError("'tokens' is not a list of strings")
        if tokens[:1] != [PAD_TOKEN] or len(set(tokens)) != len(tokens):
            raise ValueError(f"'tokens' must start with {PAD_TOKEN} and hold no token twice")
        specials = [f"{f}={s}" for f in ("genre", "title", "year") for s in (NONE, UNKNOWN)]
        if not set(specials) <= set(tokens):
            raise ValueError(f"'tokens' lacks one of {', '.join(specials)}")
        if years is not None and not (
            isinstance(years, list) and len(years) == 2 and all(type(y) is int for y in years)
        ):
            raise ValueError("'years' is not [first, last]")
        max_per_field = document.get("max_per_field")
        if type(max_per_field) is not int or max_per_field < 1:
            raise ValueError("'max_per_field' is not a positive integer")
        return cls(tuple(tokens), tuple(years) if years else None, max_per_field)


class ItemMetadataEncoder:
    """One onnxruntime session over a retriever's metadata encoder, with its vocabulary:
    metadata in, vectors in the retriever's item space out."""

    def __init__(
        self,
        path: str | Path,
        vocabulary: MetadataVocabulary,
        device: str = "auto",
        threads: int = 1,
    ):
        self.path = Path(path)
        self.vocabulary = vocabulary
        self.session = onnx_session(path, device, threads)
        self.providers = self.session.get_providers()
        names = [i.name for i in self.session.get_inputs()]
        if sorted(names) != sorted(INPUT_NAMES):
            raise ValueError(
                f"{path}: inputs {', '.join(names)}, a metadata encoder takes "
                f"{', '.join(INPUT_NAMES)}"
            )

    def run(self, token_ids: np.ndarray, token_weights: np.ndarray) -> np.ndarray:
        """Item vectors (B, D) for featurized inputs (:meth:`MetadataVocabulary.featurize`)."""
        (vectors,) = self.session.run(
            [OUTPUT_NAME],
            {
                "token_ids": np.ascontiguousarray(token_ids, dtype=np.int64),
                "token_weights": np.ascontiguousarray(token_weights, dtype=np.float32),
            },
        )
        return vectors

    def embed(self, records: Sequence[object]) -> np.ndarray:
        """Item vectors (B, D) for items' metadata; ``InvalidMetadata`` names a bad field."""
        return self.run(*self.vocabulary.featurize(records))
