"""STCH (Lin et al., ICML 2024, "Smooth Tchebycheff Scalarization for Multi-Objective
Optimization"), in the multi-task form of the authors' code: log-losses normalized by a nadir
point estimated during a warm-up."""

from __future__ import annotations

import torch

from ._state import state_dtype
from .base import LossMethod, NonFinitePolicy, check_loss_vector

__all__ = ["STCH"]


class STCH(LossMethod):
    """Smooth Tchebycheff: ``T mu log sum_i exp(p_i f_i / mu)``, ``f_i = log(L_i / n_i + eps)``,
    a smooth ``T max_i p_i f_i`` (the ideal point is 0 in this normalized log space; n is the
    nadir point); its gradient weights are ``w_i = T s_i p_i / (L_i + eps n_i)`` with
    ``s = softmax(p f / mu)``.

    Warm-up (the authors' code): for the first ``warmup_epochs`` epochs the total is
    ``sum_i log(L_i + eps)`` (``w_i = 1 / (L_i + eps)``); the nadir point n is the mean loss
    over the last warm-up epoch, unless given. The authors' ``STCH_warmup_epoch=k`` (LibMTL
    default 4: epochs 0..k-1 plain, epoch k estimating the nadir) is ``warmup_epochs=k + 1``.

    Args:
        mu: the smoothing parameter (> 0; authors' MTL default 1).
        warmup_epochs: epochs of log-loss warm-up (default 5 = LibMTL's default); 0 needs
            ``nadir``.
        nadir: a fixed nadir point n (T,), positive; skips its estimation (fixes T).
        preference: the preference vector p (T,), positive (default all ones, as the authors'
            MTL code; fixes T).
        eps: the shift inside the log (1e-20, the authors' value).

    Engine contract: ``needs = "losses"``; back-propagate ``method(losses)`` once per step and
    call ``method.epoch_end()`` at the end of every epoch (one host read there, none per
    step).
    """

    deterministic = False
    state_names = ("nadir_sum", "nadir_batches")
    lazy_names = ("nadir",)
    host_state = ("epoch",)

    def __init__(self, *, mu: float = 1.0, warmup_epochs: int = 5,
                 nadir: torch.Tensor | None = None, preference: torch.Tensor | None = None,
                 eps: float = 1e-20, on_nonfinite: NonFinitePolicy = "raise") -> None:
        super().__init__(on_nonfinite=on_nonfinite)
        if not mu > 0:
            raise ValueError(f"mu must be > 0, got {mu}")
        if not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be an int >= 0, got {warmup_epochs!r}")
        if warmup_epochs == 0 and nadir is None:
            raise ValueError("STCH needs warmup_epochs >= 1 to estimate the nadir point, "
                             "or a given nadir")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.mu, self.warmup_epochs, self.eps = mu, warmup_epochs, eps
        self.epoch = 0
        self.register_buffer("nadir", None)
        self.fixed_nadir = nadir is not None
        for name, value in (("nadir", nadir), ("preference", preference)):
            if value is None:
                continue
            value = torch.as_tensor(value)
            T = check_loss_vector(self, value)
            if self.num_tasks is not None and T != self.num_tasks:
                raise ValueError(f"nadir and preference must have the same length, got "
                                 f"{self.num_tasks} and {T}")
            if not bool((value > 0).all()):
                raise ValueError(f"{name} must be positive, got {value.tolist()}")
            self.num_tasks = T
            if name == "nadir":
                self.nadir = value.detach().clone()
        pref = torch.empty(0) if preference is None else torch.as_tensor(preference).clone()
        self.register_buffer("preference", pref, persistent=False)

    def stateful(self) -> bool:
        return True

    def _initial_state(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        dtype = state_dtype(like.dtype)
        return {"nadir_sum": torch.zeros(like.shape[0], dtype=dtype, device=like.device),
                "nadir_batches": torch.zeros((), dtype=dtype, device=like.device)}

    def _step(self, losses, state, proposal):
        T = losses.shape[0]
        if self.epoch < self.warmup_epochs:
            new = {}
            if not self.fixed_nadir and self.epoch == self.warmup_epochs - 1:
                new = {"nadir_sum": state["nadir_sum"]
                       + losses.detach().to(state["nadir_sum"].dtype),
                       "nadir_batches": state["nadir_batches"] + 1}
            shifted = losses + self.eps
            return (torch.log(shifted).sum(), 1 / shifted.detach()), new
        nadir = self.nadir.to(losses.dtype)
        pref = self.preference.to(losses.dtype) if self.preference.numel() else 1.0
        f = torch.log(losses / nadir + self.eps)
        total = T * self.mu * torch.logsumexp(pref * f / self.mu, dim=0)
        s = torch.softmax(pref * f.detach() / self.mu, dim=0)
        return (total, T * s * pref / (losses.detach() + self.eps * nadir)), {}

    @torch.no_grad()
    def epoch_end(self) -> None:
        """Close the epoch. Closing the last warm-up epoch fixes the nadir point to its mean
        losses; if no step of that epoch was counted (none run, or all skipped), the warm-up
        is extended by one epoch instead."""
        if self.epoch == self.warmup_epochs - 1 and not self.fixed_nadir:
            if self.nadir_batches is None or float(self.nadir_batches) == 0:
                return
            self.nadir = self.nadir_sum / self.nadir_batches
        self.epoch += 1

    def extra_repr(self) -> str:
        return (f"mu={self.mu}, warmup_epochs={self.warmup_epochs}, eps={self.eps}, "
                f"{super().extra_repr()}")
