"""Time-interval-aware sequence augmentation with a contrastive objective, of the TiCoSeRec
kind (Dang et al., "Uniform Sequence Better: Time Interval Aware Data Augmentation for
Sequential Recommendation", AAAI'23), for any encoder in ``training.models``.

Train with it through the CLI::

    python -m training train --data synthetic --model sasrec --augment ticoserec \
        --augment-option weight=0.1 --augment-option temperature=0.5 --out runs/tico

Each batch's input windows get two augmented views; the encoder's final state of each view
(the user state after the newest event) enters an InfoNCE loss over the batch (NT-Xent:
cosine similarity over a temperature, the other view of the same window the positive, the
other 2b - 2 views the negatives), weighted by ``weight`` and added to the next-item loss
(``TimeIntervalAugmentation.loss``).

The operators make a sequence more uniform in time, or change it only where its time
intervals are most even, measured by the coefficient of variation (CV) of the intervals
between consecutive events of the window (``interval_cv``). Each view draws one operator
per row, with the relative probabilities ``p_insert``, ``p_replace``, ``p_crop`` and
``p_reorder``; ``rate`` is the share of a sequence an operator changes (at least one event):

- **Ti-Insert**: the ``rate`` share of the largest intervals each get an item inserted
  halfway in time, the item most similar to the event before. Halving an interval ``x`` of
  ``m`` intervals whose squares sum to ``q`` lowers the CV exactly when
  ``x^2 >= 2 q / (m + 1)``, and each such halving keeps the next one's condition, so only
  intervals that pass it are split: the CV never increases (TiCoSeRec inserts at the
  largest intervals unconditionally, which raises the CV of an already even sequence).
- **Ti-Replace** (TiCoSeRec's Ti-Substitute): the events before the ``rate`` share of the
  largest intervals, the ones most isolated in time, become their most similar item.
  Times stay, so the CV does too.
- **Ti-Crop**: the ``1 - rate`` share of consecutive events whose intervals have the
  lowest CV; a row whose best span is less even than the whole sequence stays whole.
- **Ti-Reorder**: the events of the most even span of ``rate`` of the sequence (at least
  two) are shuffled, while the times stay in place: where intervals are even, the order is
  the least certain part of the history.

CoSeRec's and TiCoSeRec's Mask is left out: it needs a mask item the encoders do not have
(TiCoSeRec masks with the padding id, which the encoders read as "no event"); Ti-Replace
is the perturbation of items in place that remains.

Item similarity: the item most often adjacent to an item (just before or just after it, by
the same user) in the training events, computed once with one ``np.unique`` over the
training transitions (``adjacent_items``). It is the co-occurrence similarity of
TiCoSeRec's ItemCF model restricted to neighbours, which is what an inserted or replaced
event stands in for, and it costs no model and no pass over item pairs beyond neighbours.

All operators work on whole left-padded batches (b, L) with tensor operations; the
trainer records their time per epoch (``augment_seconds`` in the report's history).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields

import numpy as np
import torch

from training.data import SequenceData
from training.errors import ConfigError
from training.losses import nt_xent_loss
from training.models.base import UserEncoder

AUGMENTATIONS = ("none", "ticoserec")
OPERATORS = ("insert", "replace", "crop", "reorder")


@dataclass
class TiCoSeRecConfig:
    """The options of ``--augment ticoserec`` (``--augment-option KEY=VALUE``).

    ``weight`` 0.1 is CoSeRec's and TiCoSeRec's weight of the contrastive term. The
    temperature divides cosine similarities (NT-Xent, as in SimCLR): at 1.0 the logits
    span only [-1, 1] and the term barely separates views, 0.5 is SimCLR's usual setting.
    """

    weight: float = 0.1
    temperature: float = 0.5
    rate: float = 0.2  # share of a sequence an operator changes (at least one event)
    p_insert: float = 1.0  # relative probabilities of the operators
    p_replace: float = 1.0
    p_crop: float = 1.0
    p_reorder: float = 1.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ConfigError(f"--augment-option {f.name} must be a number, not {value!r}")
        if self.weight <= 0:
            raise ConfigError(f"--augment-option weight must be positive, not {self.weight}")
        if self.temperature <= 0:
            raise ConfigError(
                f"--augment-option temperature must be positive, not {self.temperature}"
            )
        if not 0 < self.rate < 1:
            raise ConfigError(f"--augment-option rate must lie in (0, 1), not {self.rate}")
        probabilities = self.probabilities()
        if min(probabilities) < 0 or sum(probabilities) <= 0:
            raise ConfigError(
                "--augment-option p_insert, p_replace, p_crop, p_reorder must be at least 0 "
                f"and not all 0, not {probabilities}"
            )

    def probabilities(self) -> list[float]:
        """The operators' relative probabilities, in ``OPERATORS`` order."""
        return [getattr(self, f"p_{name}") for name in OPERATORS]


def augment_settings(name: str | None, options: dict) -> TiCoSeRecConfig | None:
    """The checked options of augmentation ``name`` (None or "none": no augmentation).

    An unknown name, options without an augmentation, an unknown option or a bad value
    raise ``ConfigError`` naming the flag.
    """
    if name not in (None, *AUGMENTATIONS):
        raise ConfigError(
            f"augmentation (--augment) must be one of {', '.join(AUGMENTATIONS)}, not {name!r}"
        )
    if name in (None, "none"):
        if options:
            raise ConfigError("--augment-option needs --augment ticoserec")
        return None
    known = {f.name for f in fields(TiCoSeRecConfig)}
    unknown = set(options) - known
    if unknown:
        raise ConfigError(
            f"--augment-option: ticoserec has no option(s) {', '.join(sorted(unknown))}; "
            f"choose from {', '.join(sorted(known))}"
        )
    return TiCoSeRecConfig(**options)


def adjacent_items(data: SequenceData) -> np.ndarray:
    """For each item id 0..N the item most often adjacent to it in the training events
    (just before or after it, same user; ties to the smaller id); an item with no other
    neighbour maps to itself, padding to padding. int64 [N + 1]."""
    mask = data.train_mask()
    user_start = np.zeros(len(data.items), dtype=bool)
    user_start[data.offsets[:-1][data.lengths > 0]] = True
    # Consecutive events that are both training events of the same user.
    pair = mask[:-1] & mask[1:] & ~user_start[1:]
    before, after = data.items[:-1][pair], data.items[1:][pair]
    differ = before != after
    item = np.concatenate([before[differ], after[differ]])
    neighbour = np.concatenate([after[differ], before[differ]])
    n = data.n_items + 1
    keys, counts = np.unique(item * n + neighbour, return_counts=True)
    item, neighbour = keys // n, keys % n
    order = np.lexsort((neighbour, -counts, item))  # per item: most frequent, then smaller id
    item, neighbour = item[order], neighbour[order]
    best = np.ones(len(item), dtype=bool)
    best[1:] = item[1:] != item[:-1]
    table = np.arange(n, dtype=np.int64)
    table[item[best]] = neighbour[best]
    return table


def interval_cv(item_ids: torch.Tensor, time_deltas: torch.Tensor) -> torch.Tensor:
    """Per row of left-padded (b, L) windows, the coefficient of variation (std / mean) of
    the intervals between consecutive events of the window (the first event's gap, to an
    event before the window, is not one of them). 0 where all intervals are equal, and for
    fewer than two intervals. float64 (b,)."""
    has_gap = _layout(item_ids)[2]
    gaps = torch.where(has_gap, time_deltas.double(), 0.0)
    m = has_gap.sum(1).double()
    total, squares = gaps.sum(1), (gaps**2).sum(1)
    cv2 = torch.where(total > 0, m * squares / total.clamp(min=1e-300) ** 2 - 1, 0.0)
    return cv2.clamp(min=0).sqrt()


def _layout(item_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positions (L,), events per row (b,) and whether each position has an interval, i.e.
    an earlier event in its window (b, L): valid positions are the right-most n."""
    length = item_ids.shape[1]
    position = torch.arange(length, device=item_ids.device)
    count = (item_ids > 0).sum(1)
    has_gap = position[None] > (length - count)[:, None]
    return position, count, has_gap


def _descending_rank(values: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """Each eligible position's rank (0 = largest) in its row, earlier positions first on
    ties; ineligible positions rank L."""
    length = values.shape[1]
    key = torch.where(eligible, values, float("-inf"))
    order = torch.sort(key, dim=1, descending=True, stable=True).indices  # (b, L)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(length, device=values.device).expand_as(order))
    return torch.where(eligible, rank, length)


def _most_uniform_span(
    gaps: torch.Tensor,
    count: torch.Tensor,
    span: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The last position (b,) of the run of ``span`` (b,) consecutive events whose
    intervals have the lowest squared CV, and that CV² (b,). Ties go to the newest run, or
    to one drawn from ``generator`` when given (runs of two events all tie at CV 0).
    ``gaps`` (b, L) float64 holds the intervals, 0 where a position has none."""
    length = gaps.shape[1]
    position = torch.arange(length, device=gaps.device)
    # Run sums are differences of running sums: in whole seconds and int64 they are exact,
    # where float64 would lose a run of second-long gaps after one of years (squares 1e18).
    # No overflow while a window spans less than 3e9 s (the squares sum below its square).
    seconds = torch.round(gaps).long()
    sums, squares = torch.cumsum(seconds, 1), torch.cumsum(seconds**2, 1)  # (b, L)
    start = position[None] - span[:, None] + 1  # (b, L): the run ending at each position
    inside = start >= (length - count)[:, None]
    before = start.clamp(min=0)
    # The run's intervals are those of its positions after its first.
    total = (sums - sums.gather(1, before)).double()
    square = (squares - squares.gather(1, before)).double()
    m = (span - 1).double()[:, None]
    cv2 = torch.where(total > 0, m * square / total.clamp(min=1e-300) ** 2 - 1, 0.0)
    cv2 = torch.where(inside, cv2.clamp(min=0), float("inf"))
    if generator is None:
        end = length - 1 - torch.argmin(torch.flip(cv2, dims=[1]), dim=1)  # first: newest
    else:
        lowest = cv2 == cv2.min(1, keepdim=True).values
        draw = torch.rand(cv2.shape, generator=generator, dtype=torch.float64)
        end = torch.argmin(torch.where(lowest, draw, 2.0), dim=1)
    return end, cv2.gather(1, end[:, None]).squeeze(1)


class TimeIntervalAugmentation:
    """The operators and the contrastive term of ``--augment ticoserec`` (module docstring).

    ``similar`` maps each item id to the item an insert or a replace puts in its place
    (``adjacent_items``); views are at most ``max_len`` wide; ``seed`` seeds the draws of
    operators and shuffles, so the same batches give the same views.
    """

    def __init__(self, config: TiCoSeRecConfig, similar: np.ndarray, max_len: int, seed: int):
        self.config = config
        self.similar = torch.from_numpy(np.asarray(similar, dtype=np.int64))
        self.max_len = max_len
        self.generator = torch.Generator().manual_seed(seed)
        self.probabilities = torch.tensor(config.probabilities(), dtype=torch.float64)
        self.seconds = 0.0  # time spent making views since the last take_seconds()

    def _changed(self, count: torch.Tensor) -> torch.Tensor:
        """How many events an operator changes in a row of ``count`` events (at least 1)."""
        return torch.floor(self.config.rate * count.double()).long().clamp(min=1)

    def insert(
        self, item_ids: torch.Tensor, time_deltas: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Ti-Insert: an item halfway into each of the largest intervals whose halving makes
        the row more even; the oldest events give way beyond ``max_len``."""
        length = item_ids.shape[1]
        position, count, has_gap = _layout(item_ids)
        gaps = torch.where(has_gap, time_deltas.double(), 0.0)  # (b, L)
        m = has_gap.sum(1, keepdim=True)
        squares = (gaps**2).sum(1, keepdim=True)
        evens_out = has_gap & (gaps > 0) & (gaps**2 * (m + 1) >= 2 * squares)
        chosen = evens_out & (_descending_rank(gaps, evens_out) < self._changed(count)[:, None])
        # Distance of each event from the newest after the inserts to its right (and its own).
        later = chosen.sum(1, keepdim=True) - chosen.cumsum(1)  # inserts right of a position
        from_end = (length - 1 - position)[None] + later  # (b, L)
        width = min(self.max_len, length + int(chosen.sum(1).max()))

        def column(keep: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
            # Column 0 of the (b, width + 1) output takes whatever is not kept.
            return torch.where(keep & (distance < width), width - distance, 0)

        kept, added = column(item_ids > 0, from_end), column(chosen, from_end + 1)
        half = time_deltas / 2
        left = torch.roll(item_ids, 1, dims=1)  # (b, L): the event before each position
        ids = torch.zeros(len(item_ids), width + 1, dtype=item_ids.dtype)
        ids.scatter_(1, kept, item_ids).scatter_(1, added, self.similar[left])
        deltas = torch.zeros(len(item_ids), width + 1, dtype=time_deltas.dtype)
        deltas.scatter_(1, kept, torch.where(chosen, time_deltas - half, time_deltas))
        deltas.scatter_(1, added, half)
        return ids[:, 1:], deltas[:, 1:]

    def replace(
        self, item_ids: torch.Tensor, time_deltas: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Ti-Replace: the events before the largest intervals become their similar item."""
        _, count, has_gap = _layout(item_ids)
        gaps = torch.where(has_gap, time_deltas.double(), 0.0)
        chosen = has_gap & (_descending_rank(gaps, has_gap) < self._changed(count)[:, None])
        # An interval sits at the later of its two events; the event before it is replaced.
        chosen = torch.roll(chosen, -1, dims=1)  # the last column gets column 0: no interval
        return torch.where(chosen, self.similar[item_ids], item_ids), time_deltas

    def crop(
        self, item_ids: torch.Tensor, time_deltas: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Ti-Crop: the most even run of all but ``rate`` of the events, when it is at least
        as even as the whole row (the row whole otherwise)."""
        length = item_ids.shape[1]
        position, count, has_gap = _layout(item_ids)
        gaps = torch.where(has_gap, time_deltas.double(), 0.0)
        keep = (count - self._changed(count)).clamp(min=1)
        end, best = _most_uniform_span(gaps, count, keep)
        whole = _most_uniform_span(gaps, count, count.clamp(min=1))[1]
        cut = (count >= 2) & (best <= whole)
        shift = torch.where(cut, length - 1 - end, 0)[:, None]  # (b, 1) move right by
        first = torch.where(cut, end - keep + 1, length - count)[:, None]
        source = position[None] - shift  # (b, L): the input position of each output one
        taken = source >= first
        source = source.clamp(min=0)
        ids = torch.where(taken, item_ids.gather(1, source), 0)
        deltas = torch.where(taken, time_deltas.gather(1, source), 0.0)
        return ids, deltas

    def reorder(
        self, item_ids: torch.Tensor, time_deltas: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Ti-Reorder: shuffle the items of the most even run of ``rate`` of the events (at
        least two; one of the most even at random); the times stay at their positions."""
        position, count, has_gap = _layout(item_ids)
        gaps = torch.where(has_gap, time_deltas.double(), 0.0)
        span = torch.minimum(self._changed(count).clamp(min=2), count.clamp(min=1))
        end, _ = _most_uniform_span(gaps, count, span, self.generator)
        start = (end - span + 1)[:, None]
        inside = (
            (count >= 2)[:, None] & (position[None] >= start) & (position[None] <= end[:, None])
        )
        # Keys of the run fall in (start - 0.5, end + 0.5): sorting shuffles it in place.
        noise = torch.rand(item_ids.shape, generator=self.generator, dtype=torch.float64)
        key = torch.where(inside, start - 0.5 + noise * span[:, None], position[None].double())
        return item_ids.gather(1, torch.argsort(key, dim=1)), time_deltas

    def view(
        self, item_ids: torch.Tensor, time_deltas: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One augmented view of left-padded (b, L) windows: an operator drawn per row; the
        result is left-padded to the widest row, at most ``max_len``."""
        operator = torch.multinomial(
            self.probabilities, len(item_ids), replacement=True, generator=self.generator
        )
        parts = []
        for index, name in enumerate(OPERATORS):
            rows = torch.nonzero(operator == index).squeeze(1)
            if len(rows):
                parts.append((rows, *getattr(self, name)(item_ids[rows], time_deltas[rows])))
        return _stack_rows(parts, len(item_ids))

    def views(
        self, item_ids: torch.Tensor, time_deltas: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Two views of each window stacked into one left-padded batch (2b, W): rows
        ``i`` and ``b + i`` are the two views of window ``i``."""
        first, second = self.view(item_ids, time_deltas), self.view(item_ids, time_deltas)
        b = len(item_ids)
        rows = torch.arange(2 * b)
        return _stack_rows([(rows[:b], *first), (rows[b:], *second)], 2 * b)

    def loss(
        self,
        model: UserEncoder,
        item_ids: torch.Tensor,
        time_deltas: torch.Tensor,
        device: torch.device,
        *,
        groups: int = 1,
    ) -> torch.Tensor:
        """``weight`` times the NT-Xent loss between the final states of two views of each
        window of the (b, L) batch (kept on the CPU, where the views are made); the encoder
        reads the views in up to ``groups`` width groups (``UserEncoder.last_states``)."""
        started = time.perf_counter()
        ids, deltas = self.views(item_ids, time_deltas)  # (2b, W)
        self.seconds += time.perf_counter() - started
        states = model.last_states(ids.to(device), deltas.to(device), groups)  # (2b, d)
        first, second = states.chunk(2)
        return self.config.weight * nt_xent_loss(first, second, self.config.temperature)

    def take_seconds(self) -> float:
        """The seconds spent making views since the last call."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def _stack_rows(
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter (row indices, ids, deltas) parts of different widths into one batch of
    ``rows`` rows, left-padded to the widest part with its all-padding columns cut."""
    width = max(ids.shape[1] for _, ids, _ in parts)
    ids = torch.zeros(rows, width, dtype=parts[0][1].dtype)
    deltas = torch.zeros(rows, width, dtype=parts[0][2].dtype)
    for index, part_ids, part_deltas in parts:
        ids[index, width - part_ids.shape[1] :] = part_ids
        deltas[index, width - part_ids.shape[1] :] = part_deltas
    used = torch.nonzero((ids > 0).any(0))
    first = int(used[0]) if len(used) else width - 1
    return ids[:, first:], deltas[:, first:]


def build_augmentation(
    name: str | None, options: dict, data: SequenceData, max_len: int, seed: int
) -> TimeIntervalAugmentation | None:
    """The augmentation a ``TrainConfig`` names, with its similarity table from ``data``'s
    training events; None when it names none."""
    config = augment_settings(name, options)
    if config is None:
        return None
    return TimeIntervalAugmentation(config, adjacent_items(data), max_len, seed)
