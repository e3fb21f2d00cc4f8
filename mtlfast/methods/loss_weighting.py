"""Loss weighting methods: UW, DWA, RLW, GLS. The engine does one backward of ``method(losses)``.

Each call of ``method(losses)`` (or ``method.loss_weights(losses)``) is one training step; see
``LossMethod`` in base.py for the shared contract and the non-finite policy.
"""

from __future__ import annotations

import torch
from torch import nn

from ._state import RandomStream, state_dtype
from .base import LossMethod, NonFinitePolicy

__all__ = ["DWA", "GLS", "RLW", "UW"]


class UW(LossMethod):
    """Uncertainty weighting (Kendall et al., CVPR 2018): learnable log-variances
    ``s_i = log sigma_i^2``, total ``sum_i (exp(-s_i) L_i / 2 + s_i / 2)``.

    Args:
        num_tasks: T; the log-variances ``log_var`` (an ``nn.Parameter`` of shape (T,)) exist
            from construction so they can be handed to the optimizer.
        init_log_var: initial ``s_i`` (0: unit weights 1/2; LibMTL uses -0.5).

    Engine contract: ``needs = "losses"``; back-propagate ``method(losses)`` (its gradient
    also reaches ``log_var``, the regularizer ``s_i / 2`` included); add
    ``method.parameters()`` to the optimizer. ``loss_weights`` gives ``exp(-s_i) / 2``.
    """

    deterministic = False

    def __init__(self, num_tasks: int, *, init_log_var: float = 0.0,
                 on_nonfinite: NonFinitePolicy = "raise") -> None:
        super().__init__(on_nonfinite=on_nonfinite)
        if not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}")
        self.log_var = nn.Parameter(torch.full((num_tasks,), float(init_log_var)))
        self.num_tasks = num_tasks

    def stateful(self) -> bool:
        return True

    def _step(self, losses, state, proposal):
        weights = 0.5 * torch.exp(-self.log_var)
        return ((weights * losses + 0.5 * self.log_var).sum(), weights), {}


class DWA(LossMethod):
    """Dynamic Weight Average (Liu et al., CVPR 2019): ``w_i = T softmax(r / temperature)_i``
    with ``r_i = Lbar_i(e-1) / Lbar_i(e-2)``, the ratio of task i's mean loss over the two
    previous epochs; ``w = 1`` during the first two epochs. Total ``sum_i w_i L_i``.

    Args:
        temperature: the softmax temperature (paper: 2).

    Engine contract: ``needs = "losses"``; back-propagate ``method(losses)`` every step (the
    step's losses are summed into the running epoch mean on the device), and call
    ``method.epoch_end()`` once at the end of every epoch (one host read there, none per step).
    """

    deterministic = False
    state_names = ("epoch_loss_sum", "epoch_batches", "epoch_means")
    host_state = ("epochs_done",)

    def __init__(self, *, temperature: float = 2.0,
                 on_nonfinite: NonFinitePolicy = "raise") -> None:
        super().__init__(on_nonfinite=on_nonfinite)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.epochs_done = 0

    def _initial_state(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        T, dtype = like.shape[0], state_dtype(like.dtype)
        return {"epoch_loss_sum": torch.zeros(T, dtype=dtype, device=like.device),
                "epoch_batches": torch.zeros((), dtype=dtype, device=like.device),
                "epoch_means": torch.ones(2, T, dtype=dtype, device=like.device)}

    def _step(self, losses, state, proposal):
        T = losses.shape[0]
        means = state["epoch_means"]
        if self.epochs_done >= 2:
            weights = T * torch.softmax(means[1] / means[0] / self.temperature, dim=0)
        else:
            weights = torch.ones_like(state["epoch_loss_sum"])
        weights = weights.to(losses.dtype)
        total = state["epoch_loss_sum"] + losses.detach().to(state["epoch_loss_sum"].dtype)
        new = {"epoch_loss_sum": total, "epoch_batches": state["epoch_batches"] + 1,
               "epoch_means": means}
        return ((weights * losses).sum(), weights), new

    @torch.no_grad()
    def epoch_end(self) -> None:
        """Close the epoch: its mean losses become the newest of the two kept; reset the sums.
        An epoch without any counted step (none run, or all skipped) changes nothing."""
        if self.epoch_batches is None or float(self.epoch_batches) == 0:
            return
        mean = self.epoch_loss_sum / self.epoch_batches
        self.epoch_means.copy_(torch.stack([self.epoch_means[1], mean]))
        self.epoch_loss_sum.zero_()
        self.epoch_batches.zero_()
        self.epochs_done += 1

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, {super().extra_repr()}"


class RLW(LossMethod):
    """Random loss weighting (Lin et al., TMLR 2022, "Reasonable Effectiveness of Random
    Weighting"): ``w = softmax(z)``, ``z ~ N(0, I_T)`` drawn anew every step; total
    ``sum_i w_i L_i``.

    Args:
        seed: seed of the method's own generator (``z = torch.randn(T, generator=g)`` in the
            losses' dtype, on their device); None draws one from torch's global generator.

    Engine contract: ``needs = "losses"``; back-propagate ``method(losses)`` once per step.
    A skipped or failed step leaves the generator where it was; on a CUDA device under the
    engine's sync-free skip mode that decision reads the step's flag (one synchronization).
    """

    deterministic = False

    def __init__(self, *, seed: int | None = None,
                 on_nonfinite: NonFinitePolicy = "raise") -> None:
        super().__init__(on_nonfinite=on_nonfinite)
        self.rng = RandomStream(seed)

    @property
    def seed(self) -> int:
        return self.rng.seed

    def _step(self, losses, state, proposal):
        z = self.rng.draw(proposal, losses.device, lambda gen: torch.randn(
            losses.shape[0], generator=gen, dtype=losses.dtype, device=losses.device))
        weights = torch.softmax(z, dim=0)
        return ((weights * losses).sum(), weights), {}

    def extra_repr(self) -> str:
        return f"seed={self.seed}, {super().extra_repr()}"


class GLS(LossMethod):
    """Geometric loss strategy (Chennupati et al., CVPR-W 2019): total
    ``(prod_i L_i)^(1/T) = exp(mean_i log L_i)``; its gradient is ``sum_i w_i grad L_i`` with
    ``w_i = GM / (T L_i)``.

    The losses must be positive: a zero or negative loss is invalid input like NaN (raises
    ``ValueError``, or skips the step with ``on_nonfinite="skip"``).

    Engine contract: ``needs = "losses"``; back-propagate ``method(losses)`` once per step.
    """

    def _valid(self, losses):
        return (torch.isfinite(losses) & (losses > 0)).all()

    def _check_valid(self, losses):
        if losses.device.type != "meta" and not bool((losses > 0).all()):
            raise ValueError("GLS: losses must be positive (the geometric mean takes their log)")

    def _step(self, losses, state, proposal):
        total = torch.exp(torch.log(losses).mean())
        return (total, total.detach() / (losses.shape[0] * losses.detach())), {}
