"""FAMO (Liu et al., NeurIPS 2023, "FAMO: Fast Adaptive Multitask Optimization"), Algorithm 2."""

from __future__ import annotations

from typing import Any, Literal

import torch

from ._common import LazyStateMixin, LossStepMethod, check_loss_vector, state_dtype
from .base import NonFinitePolicy

__all__ = ["FAMO"]


class FAMO(LazyStateMixin, LossStepMethod):
    """FAMO: task weights ``z = softmax(xi)``, total ``sum_i (z_i / c) log(L_i - b_i + eps)``
    with ``c = sum_i z_i / (L_i - b_i + eps)`` (z and c constants for the backward), so the
    update is ``sum_i w_i g_i`` with ``w_i = z_i / (c (L_i - b_i + eps))``. After the model
    step the logits learn from the decrease of the log-losses,
    ``delta_i = log(L_i^before - b_i + eps) - log(L_i^after - b_i + eps)``: ``xi`` takes one Adam
    step (lr, L2 weight decay, betas (0.9, 0.999), eps 1e-8, exactly ``torch.optim.Adam``) along
    ``J_softmax(xi)^T delta = z * (delta - z . delta)``.

    Args:
        lr: the logits' learning rate (paper 0.025).
        weight_decay: the logits' L2 regularization gamma (paper's Algorithm 2 and LibMTL:
            1e-3; the official code uses 1e-5).
        min_losses: lower bounds b (T,) of the losses (default 0; fixes T).
        eps: the shift inside the log (1e-8).
        post_step_losses: where ``L^after`` comes from:
            - "extra_forward" (the paper): after ``optimizer.step()`` the loop recomputes the
              losses on the same batch (no grad) and calls ``method.update(new_losses)``.
            - "next_batch" (no extra forward): the next step's losses, measured on the next
              batch at the updated parameters, stand in for ``L^after``; the logits update
              runs inside the next call and ``update`` must not be called.

    Engine contract: ``needs = "losses"``; back-propagate ``method(losses)`` once per step;
    then, with "extra_forward" only, ``method.update(new_losses)`` after ``optimizer.step()``.
    The logits and Adam moments are buffers (not parameters: no user optimizer may step
    them) and round-trip through ``state_dict``.
    """

    deterministic = False
    lazy_buffers = ("logits", "adam_exp_avg", "adam_exp_avg_sq", "adam_step", "prev_losses",
                    "prev_valid")
    betas = (0.9, 0.999)
    adam_eps = 1e-8

    def __init__(self, *, lr: float = 0.025, weight_decay: float = 1e-3,
                 min_losses: torch.Tensor | None = None, eps: float = 1e-8,
                 post_step_losses: Literal["extra_forward", "next_batch"] = "extra_forward",
                 on_nonfinite: NonFinitePolicy = "raise") -> None:
        super().__init__(on_nonfinite=on_nonfinite)
        if not lr >= 0 or not weight_decay >= 0 or not eps >= 0:
            raise ValueError(f"lr, weight_decay and eps must be >= 0, got {lr}, "
                             f"{weight_decay}, {eps}")
        if post_step_losses not in ("extra_forward", "next_batch"):
            raise ValueError("post_step_losses must be 'extra_forward' or 'next_batch', "
                             f"got {post_step_losses!r}")
        self.lr, self.weight_decay, self.eps = lr, weight_decay, eps
        self.post_step_losses = post_step_losses
        self._register_lazy_buffers()
        if min_losses is None:
            self.register_buffer("min_losses", torch.empty(0), persistent=False)
        else:
            min_losses = torch.as_tensor(min_losses)
            self.num_tasks = check_loss_vector(self, min_losses)
            self.register_buffer("min_losses", min_losses.detach().clone(), persistent=False)
        self._stepped = False  # host flag: an update() before any step is a usage error

    def stateful(self) -> bool:
        return True

    def get_extra_state(self) -> Any:
        return {**super().get_extra_state(), "stepped": self._stepped}

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        self._stepped = state["stepped"]

    def _allocate(self, losses: torch.Tensor) -> None:
        if self.logits.numel() == 0:
            T, dtype, device = losses.shape[0], state_dtype(losses.dtype), losses.device
            for name in ("logits", "adam_exp_avg", "adam_exp_avg_sq", "prev_losses"):
                setattr(self, name, torch.zeros(T, dtype=dtype, device=device))
            self.adam_step = torch.zeros((), dtype=dtype, device=device)
            self.prev_valid = torch.zeros((), dtype=torch.bool, device=device)

    def _shifted(self, losses: torch.Tensor) -> torch.Tensor:
        b = self.min_losses if self.min_losses.numel() else 0.0
        return losses - b + self.eps

    @torch.no_grad()
    def _update_logits(self, new_losses: torch.Tensor, ok: torch.Tensor) -> None:
        """One masked Adam step on the logits from ``delta = log D(prev) - log D(new)``."""
        xi = self.logits
        delta = torch.log(self._shifted(self.prev_losses)) \
            - torch.log(self._shifted(new_losses.to(xi.dtype)))
        z = torch.softmax(xi, dim=0)
        grad = z * (delta - z @ delta) + self.weight_decay * xi
        beta1, beta2 = self.betas
        step = self.adam_step + 1
        exp_avg = torch.lerp(self.adam_exp_avg, grad, 1 - beta1)
        exp_avg_sq = self.adam_exp_avg_sq * beta2 + (1 - beta2) * grad * grad
        denom = (exp_avg_sq.sqrt() / (1 - beta2**step).sqrt()) + self.adam_eps
        xi_new = xi - (self.lr / (1 - beta1**step)) * exp_avg / denom
        ok = ok & self.prev_valid
        for buf, new in ((self.adam_step, step), (self.adam_exp_avg, exp_avg),
                         (self.adam_exp_avg_sq, exp_avg_sq), (self.logits, xi_new)):
            buf.copy_(torch.where(ok, new, buf))

    def _step(self, losses, ok):
        self._allocate(losses)
        valid = torch.ones((), dtype=torch.bool, device=losses.device) if ok is None else ok
        if self.post_step_losses == "next_batch":
            self._update_logits(losses.detach(), valid)
        with torch.no_grad():
            self.prev_losses.copy_(torch.where(valid, losses.detach(), self.prev_losses))
            self.prev_valid.copy_(self.prev_valid | valid)
        self._stepped = True
        shifted = self._shifted(losses)
        z = torch.softmax(self.logits, dim=0).to(losses.dtype)
        c = (z / shifted.detach()).sum()
        total = (z / c * torch.log(shifted)).sum()
        return total, z / (c * shifted.detach())

    def update(self, new_losses: torch.Tensor) -> None:
        """Learn the logits from the losses recomputed on the same batch after
        ``optimizer.step()`` ("extra_forward" mode only)."""
        if self.post_step_losses != "extra_forward":
            raise RuntimeError("FAMO(post_step_losses='next_batch') updates its logits inside "
                               "the next call; do not call update()")
        if not self._stepped:
            raise RuntimeError("FAMO.update(new_losses) must follow a step (method(losses))")
        self.bind_tasks(check_loss_vector(self, new_losses))
        self._raise_if_invalid(new_losses)
        self._update_logits(new_losses.detach(), self._valid(new_losses))

    def extra_repr(self) -> str:
        return (f"lr={self.lr}, weight_decay={self.weight_decay}, eps={self.eps}, "
                f"post_step_losses={self.post_step_losses!r}, {super().extra_repr()}")
