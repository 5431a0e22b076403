import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.errors import ConfigError
from training.losses import CCL_ITEM_WEIGHT, OBJECTIVES, CrossBatchNegatives, build_objective
from training.models import build_encoder
from training.trainer import batches, training_windows

from .helpers import losses_of_steps
from .test_models import ENCODER_KINDS

# Loss -> options that make it show its behaviour within a few steps on tiny data: the
# cross-batch memory is used from the second step and holds fewer entries than one batch
# gives, so the number of negatives is the same at every later step.
TRAINING_LOSSES = {
    "full_softmax": {},
    "sampled_softmax": {},
    "cbns_softmax": {"memory_size": 256, "warmup_steps": 1},
    "ccl": {},
}


def dot(a, b):
    return sum(x * y for x, y in zip(a, b, strict=True))


def cos(a, b):
    return dot(a, b) / math.sqrt(dot(a, a) * dot(b, b))


def test_every_objective_is_registered():
    assert set(OBJECTIVES) == set(TRAINING_LOSSES)
    counts = np.ones(6, dtype=np.int64)
    assert build_objective("ccl", counts).cosine
    assert not build_objective("sampled_softmax", counts).cosine
    with pytest.raises(ConfigError, match="bad option"):
        build_objective("sampled_softmax", counts, margin=0.5)


@pytest.mark.parametrize("temperature, logq", [(1.0, True), (0.5, True), (1.0, False)])
def test_sampled_softmax_matches_the_logq_corrected_formula(temperature, logq):
    table = [[0.0, 0.0], [1.0, 0.5], [-0.5, 1.0], [0.3, -0.8]]
    states = [[0.8, -0.2], [0.1, 0.9], [-0.6, 0.4]]
    targets = [1, 2, 1]  # item 1 twice: never a negative for either of its positions
    counts = [0, 6, 2, 0]  # item 3 unseen: counted as 1
    seen = [max(c, 1) for c in counts]
    log_q = [math.log(c / sum(seen[1:])) for c in seen]

    def logit(state, item):
        return dot(state, table[item]) / temperature - (log_q[item] if logq else 0.0)

    expected = 0.0
    for state, target in zip(states, targets, strict=True):
        positive = logit(state, target)
        negatives = [logit(state, other) for other in targets if other != target]
        denominator = math.exp(positive) + sum(math.exp(s) for s in negatives)
        expected += -positive + math.log(denominator)
    expected /= len(targets)

    objective = build_objective(
        "sampled_softmax", np.array(counts), temperature=temperature, logq=logq
    )
    loss = objective(torch.tensor(states), torch.tensor(targets), torch.tensor(table))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_cosine_contrastive_loss_matches_the_simplex_formula():
    table = [[0.0, 0.0], [1.0, 0.2], [0.9, 0.5], [-1.0, 0.1], [0.6, -0.4]]
    states = [[2.0, 0.5], [0.3, 1.0]]
    targets = [1, 2]
    negatives = [2, 3, 4, 2]  # item 2 is the second position's target: not its negative
    margin, weight = 0.1, 2.0

    expected = 0.0
    for state, target in zip(states, targets, strict=True):
        hinges = [max(0.0, cos(state, table[j]) - margin) for j in negatives if j != target]
        expected += 1.0 - cos(state, table[target]) + weight * sum(hinges) / len(hinges)
    expected /= len(targets)

    objective = build_objective(
        "ccl", np.ones(5, dtype=np.int64), margin=margin, negative_weight=weight
    )
    loss = objective(
        torch.tensor(states),
        torch.tensor(targets),
        torch.tensor(table),
        negative_ids=torch.tensor(negatives),
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_cosine_contrastive_loss_adds_the_batch_targets_as_negatives_on_request():
    torch.manual_seed(0)
    states, table = torch.randn(4, 8), torch.randn(10, 8)
    targets, negatives = torch.tensor([1, 5, 5, 9]), torch.tensor([2, 3, 5])
    counts = np.ones(10, dtype=np.int64)
    options = {"margin": -0.5, "negative_weight": 1.0}
    with_batch = build_objective("ccl", counts, in_batch=True, **options)
    explicit = build_objective("ccl", counts, **options)
    torch.testing.assert_close(
        with_batch(states, targets, table, negative_ids=negatives),
        explicit(states, targets, table, negative_ids=torch.cat([negatives, targets])),
    )


def test_cosine_contrastive_weight_defaults_to_a_per_item_weight_times_the_catalogue():
    small = build_objective("ccl", np.ones(101, dtype=np.int64))
    large = build_objective("ccl", np.ones(10_001, dtype=np.int64))
    assert small.negative_weight == pytest.approx(CCL_ITEM_WEIGHT * 100)
    assert large.negative_weight == pytest.approx(CCL_ITEM_WEIGHT * 10_000)
    assert build_objective("ccl", np.ones(101), item_weight=0.01).negative_weight == 1.0
    assert build_objective("ccl", np.ones(101), negative_weight=150).negative_weight == 150
    with pytest.raises(ConfigError, match="item_weight"):
        build_objective("ccl", np.ones(101), item_weight=0.0)


def next_item_recall(seed: int = 0, **options) -> float:
    """Recall@k of free states and items trained by CCL on graded next-item targets.

    Each of 20 contexts has k likely next items, drawn half of the time; the other half the
    next item is any item. So every item has some probability after every context, as in
    real sequences, and only the k likely ones are worth ranking first.
    """
    gen = torch.Generator().manual_seed(seed)
    n_items, n_contexts, k, dim, batch = 400, 20, 10, 16, 256
    likely = torch.stack(
        [torch.randperm(n_items, generator=gen)[:k] + 1 for _ in range(n_contexts)]
    )
    states = torch.nn.Parameter(0.1 * torch.randn(n_contexts, dim, generator=gen))
    table = torch.nn.Parameter(0.1 * torch.randn(n_items + 1, dim, generator=gen))
    objective = build_objective("ccl", np.ones(n_items + 1, dtype=np.int64), **options)
    optimizer = torch.optim.Adam([states, table], lr=0.03)
    torch.manual_seed(seed)  # the objective's uniform draws
    for _ in range(120):
        context = torch.randint(0, n_contexts, (batch,), generator=gen)
        own = likely[context, torch.randint(0, k, (batch,), generator=gen)]
        anywhere = torch.randint(1, n_items + 1, (batch,), generator=gen)
        targets = torch.where(torch.rand(batch, generator=gen) < 0.5, own, anywhere)
        loss = objective(states[context], targets, table)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        scores = F.normalize(states, dim=-1) @ F.normalize(table[1:], dim=-1).T
        top = scores.topk(k, dim=-1).indices + 1  # (contexts, k)
        return (top[:, :, None] == likely[:, None, :]).any(-1).float().mean().item()


def test_cosine_contrastive_defaults_rank_the_likely_next_items_first():
    # A likely item here has probability 1/20 + 1/800 after its context: far below
    # SimpleX's per-item hinge weight 150/400, so at SimpleX's settings every item is held
    # at the margin for every context and the likely ones are not told apart (chance is
    # 10/400); the defaults' per-item weight lies below it, so they are lifted.
    assert next_item_recall() > 0.8
    assert next_item_recall(margin=0.9, negative_weight=150.0) < 0.5


# An item table for memories of ids up to 10 whose vectors the test does not look at.
TABLE = torch.zeros(11, 3)


def test_cross_batch_memory_is_a_bounded_fifo_of_detached_entries():
    memory = CrossBatchNegatives(memory_size=4, warmup_steps=0)

    def push(ids):
        ids = torch.tensor(ids)
        vectors = ids[:, None].float().repeat(1, 3).requires_grad_()  # row = its id
        memory.push(vectors * 2.0, ids)

    push([1, 2, 3])
    assert len(memory) == 3
    push([4, 5])
    vectors, ids = memory.negatives(TABLE)
    assert ids.tolist() == [2, 3, 4, 5]  # the oldest entry went first
    assert vectors[:, 0].tolist() == [4.0, 6.0, 8.0, 10.0]  # vectors move with their ids
    push([6, 7, 8, 9, 10])
    assert memory.negatives(TABLE)[1].tolist() == [7, 8, 9, 10]
    assert not memory.vectors.requires_grad and memory.vectors.grad_fn is None

    memory.reset()
    assert len(memory) == 0 and memory.negatives(TABLE) is None


def test_cross_batch_negatives_join_only_after_warm_up():
    counts = np.arange(12, dtype=np.int64)
    plain = build_objective("sampled_softmax", counts)
    cross = build_objective("cbns_softmax", counts, memory_size=64, warmup_steps=2)
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(12, 4, generator=generator)
    targets = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [2, 4, 6, 8, 10]]
    steps = [(torch.randn(5, 4, generator=generator), torch.tensor(t)) for t in targets]
    losses = [(plain(s, t, table), cross(s, t, table)) for s, t in steps]
    for without, with_memory in losses[:2]:
        torch.testing.assert_close(with_memory, without)
    without, with_memory = losses[2]
    assert with_memory.item() > without.item() + 1e-3  # more negatives, larger loss
    assert len(cross.memory) == 15

    cross.reset()
    assert len(cross.memory) == 0
    states, last_targets = steps[2]
    torch.testing.assert_close(
        cross(states, last_targets, table), plain(states, last_targets, table)
    )


def test_no_gradient_flows_into_the_cross_batch_memory():
    counts = np.ones(8, dtype=np.int64)
    objective = build_objective("cbns_softmax", counts, memory_size=8, warmup_steps=1)
    table = torch.nn.Parameter(torch.randn(8, 4))
    objective(torch.randn(2, 4), torch.tensor([1, 2]), table)  # fills the memory
    assert not objective.memory.vectors.requires_grad
    table.grad = None
    objective(torch.randn(2, 4, requires_grad=True), torch.tensor([3, 4]), table).backward()
    # Items 1 and 2 are negatives only through the memory: their rows get no gradient.
    assert table.grad[[1, 2]].abs().sum().item() == 0.0
    assert table.grad[[3, 4]].abs().sum().item() > 0.0


def test_in_batch_negatives_are_capped_at_max_negatives():
    objective = build_objective(
        "cbns_softmax", np.ones(50, dtype=np.int64), max_negatives=6, memory_size=100
    )
    states, targets = torch.randn(40, 4), torch.randint(1, 50, (40,))
    loss = objective(states, targets, torch.randn(50, 4))
    assert torch.isfinite(loss)
    assert len(objective.memory) == 6  # what one batch pushed: its capped negatives


@pytest.mark.parametrize("kind", ENCODER_KINDS)
@pytest.mark.parametrize("loss_name", TRAINING_LOSSES)
def test_each_loss_trains_each_encoder_on_tiny_data(loss_name, kind, tiny_data):
    torch.manual_seed(0)
    model = build_encoder(kind, tiny_data.n_items, max_len=12, dim=32, dropout=0.0)
    objective = build_objective(
        loss_name, tiny_data.train_item_counts(), **TRAINING_LOSSES[loss_name]
    )
    model.normalize_items = objective.cosine
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    starts, ends = training_windows(tiny_data)
    batch = next(batches(tiny_data, starts, ends, 12, batch_size=32, rng=np.random.default_rng(0)))
    losses = losses_of_steps(model, objective, batch, optimizer, steps=20)
    # From the second step: the first one has no cross-batch negatives yet.
    assert losses[-1] < 0.8 * losses[1]


def test_max_age_drops_entries_pushed_too_many_steps_ago():
    memory = CrossBatchNegatives(memory_size=100, warmup_steps=0, max_age=2)
    for ids in ([1, 2], [3], [4, 5]):
        memory.push(torch.tensor(ids)[:, None].float(), torch.tensor(ids))
    vectors, ids = memory.negatives(TABLE)
    assert ids.tolist() == [3, 4, 5]  # [1, 2] is three pushes old
    assert vectors[:, 0].tolist() == [3.0, 4.0, 5.0]
    assert len(memory) == 5  # dropped from use, not from the FIFO: size bounds that
    memory.max_age = 1
    assert memory.negatives(TABLE)[1].tolist() == [4, 5]


def test_refreshed_memory_reads_the_current_table_with_its_gradient():
    objective = build_objective(
        "cbns_softmax", np.ones(8, dtype=np.int64), memory_size=8, warmup_steps=1, refresh=True
    )
    table = torch.nn.Parameter(torch.randn(8, 4))
    objective(torch.randn(2, 4), torch.tensor([1, 2]), table)
    assert objective.memory.vectors is None  # ids only
    with torch.no_grad():
        table[1] += 5.0  # the table moves after the push
    vectors, ids = objective.memory.negatives(table)
    torch.testing.assert_close(vectors, table[[1, 2]])
    table.grad = None
    objective(torch.randn(2, 4), torch.tensor([3, 4]), table).backward()
    # Items 1 and 2 are negatives only through the memory, and now get a gradient.
    assert table.grad[[1, 2]].abs().sum(-1).min().item() > 0.0
    assert torch.isfinite(table.grad).all()


def memory_loss(states, targets, table, memory_ids, log_q, memory_logq):
    """The expected loss of one step with in-batch negatives and a memory of ``memory_ids``
    (the memory's vectors are the table's rows), written out position by position."""
    expected = 0.0
    for state, target in zip(states, targets, strict=True):
        positive = dot(state, table[target]) - log_q[target]
        negatives = [dot(state, table[j]) - log_q[j] for j in targets if j != target]
        negatives += [
            dot(state, table[j]) - (log_q[j] if memory_logq else 0.0)
            for j in memory_ids
            if j != target  # an accidental hit in the memory is masked too
        ]
        expected += -positive + math.log(math.exp(positive) + sum(map(math.exp, negatives)))
    return expected / len(targets)


@pytest.mark.parametrize("memory_logq", [True, False])
def test_memory_logits_get_the_logq_correction_and_accidental_hits_are_masked(memory_logq):
    table = [[0.0, 0.0], [1.0, 0.5], [-0.5, 1.0], [0.3, -0.8], [0.7, 0.2]]
    counts = [0, 6, 2, 1, 3]
    log_q = [math.log(max(c, 1) / sum(counts[1:])) for c in counts]
    objective = build_objective(
        "cbns_softmax", np.array(counts), memory_size=8, warmup_steps=1, memory_logq=memory_logq
    )
    objective(torch.zeros(3, 2), torch.tensor([1, 3, 4]), torch.tensor(table))  # memory: 1 3 4
    states, targets = [[0.8, -0.2], [0.1, 0.9]], [1, 2]  # item 1: also in the memory
    loss = objective(torch.tensor(states), torch.tensor(targets), torch.tensor(table))
    expected = memory_loss(states, targets, table, [1, 3, 4], log_q, memory_logq)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_cross_batch_steps_are_deterministic_with_finite_gradients():
    def run():
        torch.manual_seed(0)
        objective = build_objective(
            "cbns_softmax",
            np.arange(30),
            max_negatives=8,
            memory_size=20,
            warmup_steps=1,
            max_age=2,
        )
        table = torch.nn.Parameter(torch.randn(30, 4))
        losses, grads = [], []
        for _ in range(4):
            states = torch.randn(12, 4, requires_grad=True)
            loss = objective(states, torch.randint(1, 30, (12,)), table)
            loss.backward()
            losses.append(loss.item())
            grads.append(table.grad.clone())
            table.grad = None
        return losses, grads

    (first, first_grads), (second, second_grads) = run(), run()
    assert first == second
    for a, b in zip(first_grads, second_grads, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "option, value",
    [
        ("memory_size", 0),
        ("warmup_steps", -1),
        ("max_age", 0),
        ("max_age", 1.5),
        ("refresh", "yes"),
        ("memory_logq", 1),
    ],
)
def test_bad_cross_batch_options_are_refused_by_name(option, value):
    with pytest.raises(ConfigError, match=option):
        build_objective("cbns_softmax", np.ones(5, dtype=np.int64), **{option: value})


def test_memory_options_are_refused_without_a_memory():
    with pytest.raises(ConfigError, match="memory_logq"):
        build_objective("sampled_softmax", np.ones(5, dtype=np.int64), memory_logq=False)
    with pytest.raises(ConfigError, match="max_age"):
        build_objective("sampled_softmax", np.ones(5, dtype=np.int64), max_age=3)
