"""The optimisers of the project, and the one function that makes them.

- ``adam``: AdamW, decoupled weight decay (the same as Adam at decay 0). The user encoders
  (``training.trainer``) train with it, and so can the CTR head, on its summed task losses.
- ``adatask``: ``AdaTaskAdam``, Adam with task-wise moments, for the multi-task CTR head.

``build_optimizer`` makes either; ``optimizer_step`` takes one update from per-task losses whichever
it is.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from training.errors import ConfigError

OPTIMIZERS = ("adam", "adatask")


def build_optimizer(
    name: str,
    parameters: Iterable[torch.nn.Parameter],
    *,
    lr: float,
    weight_decay: float = 0.0,
    n_tasks: int = 1,
) -> torch.optim.Optimizer:
    """The optimiser ``name`` (one of ``OPTIMIZERS``) over ``parameters``."""
    if name == "adam":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    if name == "adatask":
        return AdaTaskAdam(parameters, n_tasks, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"optimizer must be 'adam' or 'adatask', not {name!r}")


def optimizer_step(optimizer: torch.optim.Optimizer, losses: Sequence[torch.Tensor]) -> None:
    """One update from one scalar loss per task: AdaTask steps on each task's own gradient,
    any other optimiser on the gradient of their sum."""
    if isinstance(optimizer, AdaTaskAdam):
        optimizer.step(losses)
        return
    optimizer.zero_grad(set_to_none=True)
    torch.stack(list(losses)).sum().backward()
    optimizer.step()


class AdaTaskAdam(torch.optim.Optimizer):
    """Adam with task-wise adaptive learning rates (AdaTask, Yang et al., AAAI 2023).

    Each task's gradient is computed on its own (``autograd.grad`` of that task's loss), fed
    to its own first- and second-moment accumulators on every parameter, normalised by its
    own running second moment, and only then summed. A task with 100x larger gradients thus
    cannot drown the other on shared parameters, as it does in Adam on the summed loss
    (one accumulator). A parameter one task does not reach gets zero from it.

    Use ``optimizer.step(losses)`` with one scalar loss per task (no ``backward``).
    """

    def __init__(
        self,
        params,
        n_tasks: int,
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        if n_tasks < 1:
            raise ValueError("AdaTaskAdam needs at least one task")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.n_tasks = n_tasks

    def step(self, losses: Sequence[torch.Tensor]) -> None:  # type: ignore[override]
        if len(losses) != self.n_tasks:
            raise ValueError(f"expected {self.n_tasks} task losses, got {len(losses)}")
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        task_grads = [
            torch.autograd.grad(loss, params, retain_graph=k < len(losses) - 1, allow_unused=True)
            for k, loss in enumerate(losses)
        ]
        index = 0
        with torch.no_grad():
            for group in self.param_groups:
                beta1, beta2 = group["betas"]
                for p in group["params"]:
                    if not p.requires_grad:
                        continue
                    grads = [task_grads[k][index] for k in range(self.n_tasks)]
                    index += 1
                    state = self.state[p]
                    if not state:
                        state["step"] = 0
                        state["exp_avg"] = torch.zeros((self.n_tasks, *p.shape), dtype=p.dtype)
                        state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
                    state["step"] += 1
                    correction1 = 1 - beta1 ** state["step"]
                    correction2 = 1 - beta2 ** state["step"]
                    update = torch.zeros_like(p)
                    for k, grad in enumerate(grads):
                        grad = torch.zeros_like(p) if grad is None else grad
                        m, v = state["exp_avg"][k], state["exp_avg_sq"][k]
                        m.mul_(beta1).add_(grad, alpha=1 - beta1)
                        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                        update += (m / correction1) / ((v / correction2).sqrt() + group["eps"])
                    if group["weight_decay"]:
                        p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(update, alpha=-group["lr"])
