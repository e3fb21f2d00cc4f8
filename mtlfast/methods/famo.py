"""FAMO (Liu et al., NeurIPS 2023, "FAMO: Fast Adaptive Multitask Optimization"), Algorithm 2."""

from __future__ import annotations

import warnings
from typing import Literal

import torch

from ._state import state_dtype
from .base import LossMethod, NonFinitePolicy, check_loss_vector

__all__ = ["FAMO"]


class FAMO(LossMethod):
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
    A step that finds the last update() missing learns from its own losses as "next_batch"
    would, with a one-time warning, so FAMO used as a plain drop-in still learns.
    The logits and Adam moments are buffers (not parameters: no user optimizer may step
    them) and round-trip through ``state_dict``.
    """

    deterministic = False
    state_names = ("logits", "adam_exp_avg", "adam_exp_avg_sq", "adam_step", "prev_losses",
                   "prev_valid")
    host_state = ("_stepped", "_updated")
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
        if min_losses is None:
            self.register_buffer("min_losses", torch.empty(0), persistent=False)
        else:
            min_losses = torch.as_tensor(min_losses)
            self.num_tasks = check_loss_vector(self, min_losses)
            self.register_buffer("min_losses", min_losses.detach().clone(), persistent=False)
        # Host flags: "stepped" (an update() before any step is a usage error) and "updated"
        # (extra_forward: the last step's update() was called; a step without it refuses).
        self._stepped = False
        self._updated = True
        self._warned = False

    def stateful(self) -> bool:
        return True

    def _initial_state(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        T, dtype, device = like.shape[0], state_dtype(like.dtype), like.device
        state = {name: torch.zeros(T, dtype=dtype, device=device)
                 for name in ("logits", "adam_exp_avg", "adam_exp_avg_sq", "prev_losses")}
        state["adam_step"] = torch.zeros((), dtype=dtype, device=device)
        state["prev_valid"] = torch.zeros((), dtype=torch.bool, device=device)
        return state

    def _shifted(self, losses: torch.Tensor) -> torch.Tensor:
        b = self.min_losses if self.min_losses.numel() else 0.0
        return losses - b + self.eps

    @torch.no_grad()
    def _logits_step(self, state: dict[str, torch.Tensor], new_losses: torch.Tensor
                     ) -> dict[str, torch.Tensor]:
        """One Adam step on the logits from ``delta = log D(prev) - log D(new)`` (a no-op
        before the first valid step)."""
        xi = state["logits"]
        delta = torch.log(self._shifted(state["prev_losses"])) \
            - torch.log(self._shifted(new_losses.to(xi.dtype)))
        z = torch.softmax(xi, dim=0)
        grad = z * (delta - z @ delta) + self.weight_decay * xi
        beta1, beta2 = self.betas
        step = state["adam_step"] + 1
        exp_avg = torch.lerp(state["adam_exp_avg"], grad, 1 - beta1)
        exp_avg_sq = state["adam_exp_avg_sq"] * beta2 + (1 - beta2) * grad * grad
        denom = (exp_avg_sq.sqrt() / (1 - beta2**step).sqrt()) + self.adam_eps
        xi_new = xi - (self.lr / (1 - beta1**step)) * exp_avg / denom
        ready = state["prev_valid"]
        new = dict(state)
        for name, value in (("adam_step", step), ("adam_exp_avg", exp_avg),
                            ("adam_exp_avg_sq", exp_avg_sq), ("logits", xi_new)):
            new[name] = torch.where(ready, value, state[name])
        return new

    def _step(self, losses, state, proposal):
        missed = self.post_step_losses == "extra_forward" and not self._updated
        if missed and not self._warned:
            warnings.warn(
                "FAMO: update(new_losses) was not called after the last optimizer.step(); the "
                "logits learn from this step's losses instead (post_step_losses='next_batch'). "
                "For the paper's variant call method.update(new_losses) after each "
                "optimizer.step(), or build FAMO(post_step_losses='next_batch') to silence this.",
                RuntimeWarning, stacklevel=4)
            proposal.host["_warned"] = True
        if self.post_step_losses == "next_batch" or missed:
            state = self._logits_step(state, losses.detach())
        state = dict(state)
        state["prev_losses"] = losses.detach().to(state["prev_losses"].dtype)
        state["prev_valid"] = torch.ones_like(state["prev_valid"])
        proposal.host.update(_stepped=True, _updated=self.post_step_losses == "next_batch")
        shifted = self._shifted(losses)
        z = torch.softmax(state["logits"], dim=0).to(losses.dtype)
        c = (z / shifted.detach()).sum()
        total = (z / c * torch.log(shifted)).sum()
        return (total, z / (c * shifted.detach())), state

    def update(self, new_losses: torch.Tensor) -> None:
        """Learn the logits from the losses recomputed on the same batch after
        ``optimizer.step()`` ("extra_forward" mode only)."""
        if self.post_step_losses != "extra_forward":
            raise RuntimeError("FAMO(post_step_losses='next_batch') updates its logits inside "
                               "the next call; do not call update()")
        if not self._stepped:
            raise RuntimeError("FAMO.update(new_losses) must follow a step (method(losses))")
        T = check_loss_vector(self, new_losses)
        self.check_tasks(T)
        ok = self._standalone(new_losses, names=("new_losses",))
        state = self._current_state(new_losses)
        safe = new_losses if ok is None else torch.where(ok, new_losses, 1.0)
        new = self._logits_step(state, safe.detach())
        if ok is not None:
            new = {k: torch.where(ok, v, state[k]) for k, v in new.items()}
        for name, value in new.items():
            setattr(self, name, value)
        self._updated = True

    def extra_repr(self) -> str:
        return (f"lr={self.lr}, weight_decay={self.weight_decay}, eps={self.eps}, "
                f"post_step_losses={self.post_step_losses!r}, {super().extra_repr()}")
