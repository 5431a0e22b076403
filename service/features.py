"""Candidate features for the CTR head: the one definition training and serving share.

Training (``training.ctr``) and the service (``service.ranking``) call
:func:`candidate_features` with the same kind of inputs, so a history produces the same
numbers wherever it is scored. numpy only: the service never imports torch.

Inputs per request row ``b`` (batch ``B``, ``C`` candidates, ``D`` dimensions):

- ``user_embedding`` (B, D): the retriever's L2-normalised user embedding;
- ``candidate_ids`` (B, C) int64 internal ids in retrieval order (seen items already
  removed; 0 = padding slot), ``retrieval_scores`` (B, C) the index's inner products;
- ``candidate_vectors`` (B, C, D): the retriever's item vectors of the candidates (the head
  also receives them, and forms the user x item product itself);
- ``history_ids`` / ``history_ts`` (B, L): the user's events, left-padded with id 0
  (any width: only the newest ``HISTORY_WINDOW`` events are read);
- ``request_time`` (B,) int64 seconds: when the recommendation is asked for (offline: the
  time of the held-out event);
- ``items``: an :class:`ItemFeatures` built from the catalogue (serving) or from the
  training events (training).

Scalar features, in order (:func:`feature_names`):

=======================  ===============================================================
retrieval_score          inner product of user and candidate, as the index returned it
retrieval_score_gap      retrieval_score minus the row's best retrieval score (<= 0)
log_rank                 log(1 + 0-based position in the retrieved list)
cosine                   cosine of user embedding and candidate vector
log_popularity           log(1 + training interactions of the item)
log_item_age             log(1 + seconds from the item's last training interaction before
                         the request to the request), capped at ``AGE_CAP``; an item with
                         none gets the cap
log_user_gap             log(1 + seconds from the user's newest event to the request),
                         capped at ``AGE_CAP``; no history gets the cap
log_history_length       log(1 + min(known events, HISTORY_WINDOW))
genre_overlap            only when the catalogue has genres: over the candidate's genres,
                         the mean share of the user's last ``GENRE_WINDOW`` items that
                         carry the genre (0 for an item without genres)
=======================  ===============================================================

Padding slots (id 0) get all-zero features.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HISTORY_WINDOW = 50  # newest events the history features look at
GENRE_WINDOW = 20  # newest events that make the user's genre profile
AGE_CAP = 10 * 365 * 86400  # seconds; ages and gaps beyond it are cut to it
NEVER = -1  # last_seen of an item without training interactions

BASE_FEATURES = (
    "retrieval_score",
    "retrieval_score_gap",
    "log_rank",
    "cosine",
    "log_popularity",
    "log_item_age",
    "log_user_gap",
    "log_history_length",
)
GENRE_FEATURES = ("genre_overlap",)


def feature_names(with_genres: bool) -> list[str]:
    """The feature columns, in the order :func:`candidate_features` writes them."""
    return [*BASE_FEATURES, *(GENRE_FEATURES if with_genres else ())]


@dataclass
class ItemFeatures:
    """Per-item facts the features read, indexed by internal id (row 0 = padding).

    Serving builds it from the bundle's catalogue (:meth:`from_catalogue`): training counts,
    the time of the last training interaction and genres. Training builds it from the
    training events (:meth:`from_events`), which also keeps every event time, so that the
    item age is taken *as of the request*: offline requests lie inside the training period
    (leave-last-out splits per user, not in time), and an item's later interactions must not
    leak into its age. At serving time every training interaction precedes the request, so
    both give the same value.
    """

    popularity: np.ndarray  # (N + 1,) training interaction counts
    last_seen: np.ndarray  # (N + 1,) int64 seconds of the last training interaction, or NEVER
    genres: np.ndarray | None = None  # (N + 1, G) float32 multi-hot
    genre_names: tuple[str, ...] = ()
    # Optional point-in-time index over the training events, sorted by (item, time): the
    # key is item * span + (time - base), so one binary search finds "last before".
    event_keys: np.ndarray | None = None  # (E,) int64, sorted
    time_base: int = 0
    time_span: int = 1

    @property
    def n_items(self) -> int:
        return len(self.popularity) - 1

    @property
    def has_genres(self) -> bool:
        return self.genres is not None

    @property
    def names(self) -> list[str]:
        return feature_names(self.has_genres)

    @classmethod
    def from_catalogue(cls, catalogue, last_seen: np.ndarray | None = None) -> ItemFeatures:
        """From a ``service.catalogue.Catalogue`` (popularity, genres and ``last_seen``).

        ``last_seen`` overrides the catalogue's; one of the two must be present.
        """
        last_seen = last_seen if last_seen is not None else getattr(catalogue, "last_seen", None)
        if last_seen is None:
            raise ValueError("the catalogue has no last_seen_ts column; pass last_seen")
        genres, names = genre_matrix(catalogue.genres)
        return cls(
            popularity=np.asarray(catalogue.popularity, dtype=np.int64),
            last_seen=np.asarray(last_seen, dtype=np.int64),
            genres=genres,
            genre_names=names,
        )

    def with_added(self, genres: list[list[str]]) -> ItemFeatures:
        """These features with a row for each item added since the export, in internal-id
        order after the bundle's: no training events (popularity 0, never seen), and of
        its categories those the head was trained on."""
        m = len(genres)
        matrix = self.genres
        if matrix is not None:
            column = {name: j for j, name in enumerate(self.genre_names)}
            rows = np.zeros((m, matrix.shape[1]), dtype=np.float32)
            for row, names in enumerate(genres):
                for name in names:
                    if name in column:
                        rows[row, column[name]] = 1.0
            matrix = np.concatenate([matrix, rows])
        return ItemFeatures(
            popularity=np.concatenate([self.popularity, np.zeros(m, dtype=np.int64)]),
            last_seen=np.concatenate([self.last_seen, np.full(m, NEVER, dtype=np.int64)]),
            genres=matrix,
            genre_names=self.genre_names,
        )

    @classmethod
    def from_events(
        cls,
        n_items: int,
        items: np.ndarray,
        timestamps: np.ndarray,
        genres: list[list[str]] | None = None,
    ) -> ItemFeatures:
        """From the training events (item ids and times); ``genres`` per internal id."""
        items = np.asarray(items, dtype=np.int64)
        timestamps = np.asarray(timestamps, dtype=np.int64)
        base = int(timestamps.min()) if len(timestamps) else 0
        span = (int(timestamps.max()) - base if len(timestamps) else 0) + 2
        if (n_items + 1) * span >= np.iinfo(np.int64).max:
            raise ValueError("event times span too long for the point-in-time index")
        matrix, names = genre_matrix(genres)
        return cls(
            popularity=np.bincount(items, minlength=n_items + 1).astype(np.int64),
            last_seen=last_seen_from_events(n_items, items, timestamps),
            genres=matrix,
            genre_names=names,
            event_keys=np.sort(items * span + (timestamps - base)),
            time_base=base,
            time_span=span,
        )

    def last_seen_before(self, ids: np.ndarray, request_time: np.ndarray) -> np.ndarray:
        """Time of each item's last training interaction strictly before its row's request.

        ``ids`` (B, C), ``request_time`` (B,); NEVER where there is none.
        """
        ids = np.asarray(ids, dtype=np.int64)
        request = np.asarray(request_time, dtype=np.int64)[:, None]  # (b, 1)
        if self.event_keys is None:
            seen = self.last_seen[ids]
            return np.where((seen != NEVER) & (seen < request), seen, NEVER)
        offset = np.clip(request - self.time_base, 0, self.time_span - 1)  # (b, 1)
        position = np.searchsorted(self.event_keys, ids * self.time_span + offset) - 1  # (b, c)
        key = self.event_keys[np.maximum(position, 0)]
        hit = (position >= 0) & (key // self.time_span == ids)
        return np.where(hit, key % self.time_span + self.time_base, NEVER)


def last_seen_from_events(n_items: int, items: np.ndarray, timestamps: np.ndarray) -> np.ndarray:
    """(N + 1,) int64: the latest timestamp of each item in the events, NEVER for none.

    This is the ``last_seen_ts`` column the bundle's items.parquet carries.
    """
    last = np.full(n_items + 1, NEVER, dtype=np.int64)
    np.maximum.at(last, np.asarray(items, dtype=np.int64), np.asarray(timestamps, np.int64))
    return last


def genre_matrix(genres: list[list[str]] | None) -> tuple[np.ndarray | None, tuple[str, ...]]:
    """Multi-hot (N + 1, G) float32 from genre lists per internal id (row 0 = padding)."""
    if genres is None:
        return None, ()
    names = tuple(sorted({g for item in genres for g in (item or ())}))
    if not names:
        return None, ()
    column = {name: j for j, name in enumerate(names)}
    matrix = np.zeros((len(genres), len(names)), dtype=np.float32)
    for row, item in enumerate(genres):
        for genre in item or ():
            matrix[row, column[genre]] = 1.0
    matrix[0] = 0.0
    return matrix, names


def genre_overlap(
    genres: np.ndarray, history_ids: np.ndarray, candidate_ids: np.ndarray
) -> np.ndarray:
    """The ``genre_overlap`` feature (b, c): over each candidate's genres, the mean share of
    the user's newest ``GENRE_WINDOW`` events that carry the genre (0 without genres).

    ``genres`` (N + 1, G) multi-hot with row 0 empty, ``history_ids`` (b, l) left-padded
    with 0, ``candidate_ids`` (b, c).
    """
    recent = history_ids[:, -GENRE_WINDOW:]  # (b, r)
    counted = np.maximum((recent > 0).sum(axis=1), 1)[:, None]  # (b, 1)
    profile = genres[recent].sum(axis=1) / counted  # (b, g)
    candidate_genres = genres[candidate_ids]  # (b, c, g) float32
    shared = np.einsum("bcg,bg->bc", candidate_genres, profile)
    return shared / np.maximum(candidate_genres.sum(axis=-1), 1.0)


def _log_capped(seconds: np.ndarray) -> np.ndarray:
    return np.log1p(np.clip(seconds, 0, AGE_CAP).astype(np.float32))


def candidate_features(
    user_embedding: np.ndarray,
    candidate_ids: np.ndarray,
    retrieval_scores: np.ndarray,
    candidate_vectors: np.ndarray,
    *,
    history_ids: np.ndarray,
    history_ts: np.ndarray,
    request_time: np.ndarray,
    items: ItemFeatures,
) -> tuple[np.ndarray, list[str]]:
    """Scalar features (B, C, F) float32 and their names; see the module docstring.

    Computed in float32 throughout: the service builds them for every candidate of every
    request, and float64 copies of the candidate vectors were most of their cost.
    """
    user = np.asarray(user_embedding, dtype=np.float32)  # (b, d)
    ids = np.asarray(candidate_ids, dtype=np.int64)  # (b, c)
    scores = np.asarray(retrieval_scores, dtype=np.float32)  # (b, c)
    vectors = np.asarray(candidate_vectors, dtype=np.float32)  # (b, c, d)
    request = np.asarray(request_time, dtype=np.int64).reshape(-1)  # (b,)
    history_ids = np.asarray(history_ids, dtype=np.int64)[:, -HISTORY_WINDOW:]  # (b, l)
    history_ts = np.asarray(history_ts, dtype=np.int64)[:, -HISTORY_WINDOW:]  # (b, l)
    b, c = ids.shape
    real = ids > 0  # (b, c)
    names = items.names
    out = np.empty((b, c, len(names)), dtype=np.float32)

    best = np.max(np.where(real, scores, -np.inf), axis=1, keepdims=True, initial=-np.inf)
    best = np.where(np.isfinite(best), best, 0.0)
    out[..., 0] = scores
    out[..., 1] = scores - best
    out[..., 2] = np.log1p(np.arange(c, dtype=np.float32))[None, :]
    user_norm = np.sqrt(np.einsum("bd,bd->b", user, user))[:, None]  # (b, 1)
    item_norm = np.sqrt(np.einsum("bcd,bcd->bc", vectors, vectors))  # (b, c)
    dots = np.einsum("bd,bcd->bc", user, vectors)
    out[..., 3] = dots / np.maximum(user_norm * item_norm, 1e-12)
    out[..., 4] = np.log1p(items.popularity[ids].astype(np.float32))

    last = items.last_seen_before(ids, request)  # (b, c)
    age = np.where(last == NEVER, AGE_CAP, request[:, None] - last)
    out[..., 5] = _log_capped(age)

    known = history_ids > 0  # (b, l)
    has_history = known.any(axis=1)
    newest = np.max(np.where(known, history_ts, np.iinfo(np.int64).min), axis=1)
    gap = np.where(has_history, request - np.where(has_history, newest, 0), AGE_CAP)
    out[..., 6] = _log_capped(gap)[:, None]
    out[..., 7] = np.log1p(np.minimum(known.sum(axis=1), HISTORY_WINDOW).astype(np.float32))[
        :, None
    ]

    if items.has_genres:
        out[..., 8] = genre_overlap(items.genres, history_ids, ids)

    out[~real] = 0.0
    return out, names
