"""The optimisers: AdaTask's task-wise moments, and the one factory of optimisers."""

import pytest
import torch

from training.errors import ConfigError
from training.optimizers import AdaTaskAdam, build_optimizer


def _toy(kind: str, steps: int, lr: float = 0.01):
    """Shared weight w; task A = 100 (w - 1)^2 has 100x the gradient of task B = (w + 1)^2."""
    w = torch.zeros(1, requires_grad=True)
    if kind == "adatask":
        optimizer = AdaTaskAdam([w], n_tasks=2, lr=lr)
    else:
        optimizer = torch.optim.Adam([w], lr=lr)
    for _ in range(steps):
        task_a = 100 * (w - 1).pow(2).sum()
        task_b = (w + 1).pow(2).sum()
        if kind == "adatask":
            optimizer.step([task_a, task_b])
        else:
            optimizer.zero_grad()
            (task_a + task_b).backward()
            optimizer.step()
    return w, optimizer


def test_adatask_keeps_separate_moment_accumulators_per_task():
    w, optimizer = _toy("adatask", steps=1)
    state = optimizer.state[w]
    assert state["exp_avg_sq"].shape == (2, 1) and state["exp_avg"].shape == (2, 1)
    # At w = 0 the task gradients are -200 and +2: (1 - beta2) g^2 per task, not summed.
    torch.testing.assert_close(state["exp_avg_sq"][:, 0], torch.tensor([40.0, 0.004]))
    torch.testing.assert_close(state["exp_avg"][:, 0], torch.tensor([-20.0, 0.2]))
    # Each task's step is normalised by its own moment: +lr and -lr cancel.
    assert w.item() == pytest.approx(0.0, abs=1e-6)


def test_adatask_differs_from_adam_when_one_task_has_100x_larger_gradients():
    adam, _ = _toy("adam", steps=300)
    adatask, _ = _toy("adatask", steps=300)
    # Adam on the summed loss goes where the large task wants (the sum's minimum, 99/101);
    # AdaTask gives the small task an equal say and stays between the two optima.
    assert adam.item() == pytest.approx(99 / 101, abs=0.02)
    assert abs(adatask.item()) < 0.1


def test_adatask_needs_one_loss_per_task():
    w = torch.zeros(1, requires_grad=True)
    with pytest.raises(ValueError, match="2 task losses"):
        AdaTaskAdam([w], n_tasks=2).step([w.sum()])


def test_build_optimizer_makes_adamw_or_adatask_and_refuses_other_names():
    w = torch.zeros(3, requires_grad=True)
    adam = build_optimizer("adam", [w], lr=0.01, weight_decay=0.1)
    assert type(adam) is torch.optim.AdamW
    assert adam.defaults["lr"] == 0.01 and adam.defaults["weight_decay"] == 0.1
    adatask = build_optimizer("adatask", [w], lr=0.01, n_tasks=2)
    assert isinstance(adatask, AdaTaskAdam) and adatask.n_tasks == 2
    with pytest.raises(ConfigError, match="optimizer must be 'adam' or 'adatask', not 'sgd'"):
        build_optimizer("sgd", [w], lr=0.01)
