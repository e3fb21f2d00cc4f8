"""DB-MTL (Lin et al. 2023, "Dual-Balancing for Multi-Task Learning"): log-loss gradients,
tracked with an EMA and rescaled to the largest norm."""

from __future__ import annotations

import torch

from ._common import LazyStateMixin, check_matrix, check_task_losses, state_dtype
from .base import JacobianMethod, NonFinitePolicy

__all__ = ["DBMTL"]


class DBMTL(LazyStateMixin, JacobianMethod):
    """DB-MTL: loss-scale balancing by the log transform, ``h_i = grad log(L_i + eps) =
    g_i / (L_i + eps)``, an EMA ``m_i <- h_i + beta_t (m_i - h_i)`` with
    ``beta_t = beta / t^beta_sigma`` (t = 1, 2, ... counts steps, m = 0 at the start), and
    gradient-magnitude balancing ``d = sum_i (max_j |m_j| / (|m_i| + 1e-8)) m_i``.

    Args:
        beta, beta_sigma: EMA factor and its decay exponent (LibMTL defaults 0.9 and 0).
        eps: the shift inside the log (1e-8).
        on_nonfinite: "raise" (default) or "skip" (a zero update, state left unchanged).

    Engine contract: ``needs = "jacobian"``; ``aggregate(G, losses)`` once per step, where G
    (T, P) holds the gradients of the losses themselves (the method applies the chain rule of
    the log with ``losses``, so the engine differentiates the plain losses). Returns the (P,)
    update and advances the EMA (T x P floats, kept in at least float32).
    """

    deterministic = False
    lazy_buffers = ("ema", "step")

    def __init__(self, *, beta: float = 0.9, beta_sigma: float = 0.0, eps: float = 1e-8,
                 on_nonfinite: NonFinitePolicy = "raise") -> None:
        super().__init__(on_nonfinite=on_nonfinite)
        if not 0 <= beta < 1:
            raise ValueError(f"beta must lie in [0, 1), got {beta}")
        if not beta_sigma >= 0:
            raise ValueError(f"beta_sigma must be >= 0, got {beta_sigma}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.beta, self.beta_sigma, self.eps = beta, beta_sigma, eps
        self._register_lazy_buffers()

    def stateful(self) -> bool:
        return True

    def _allocate(self, G: torch.Tensor) -> None:
        T, P = G.shape
        if self.ema.numel() == 0:
            dtype = state_dtype(G.dtype)
            self.ema = torch.zeros(T, P, dtype=dtype, device=G.device)
            self.step = torch.zeros((), dtype=dtype, device=G.device)
        elif self.ema.shape != (T, P):
            raise ValueError(f"DBMTL tracks gradients of shape {tuple(self.ema.shape)}; "
                             f"got G of shape {(T, P)} (build a new method for another model)")

    @torch.no_grad()
    def aggregate(self, G: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
        T = check_matrix(self, G)
        if losses is None:
            raise ValueError("DBMTL needs the losses (gradients of log-losses): "
                             "aggregate(G, losses)")
        losses = check_task_losses(self, losses, T)
        self.bind_tasks(T)
        self._raise_if_nonfinite(G=G, losses=losses)
        self._allocate(G)
        ema, step = self.ema, self.step
        t = step + 1
        beta_t = self.beta / t**self.beta_sigma
        skip = self.on_nonfinite == "skip"
        # m <- beta_t m + (1 - beta_t) g_i / (L_i + eps): one scale and one row-scaled add (in
        # place: no T x P temporary) unless a skipped step must keep m.
        coef = (1 - beta_t) / (losses.to(ema.dtype) + self.eps)
        ema_new = ema * beta_t if skip else ema.mul_(beta_t)
        ema_new.addcmul_(G, coef[:, None])
        norms = ema_new.norm(dim=1)
        alpha = norms.max() / (norms + 1e-8)
        update = alpha @ ema_new
        if skip:
            ok = self._all_finite(G, losses)
            ema.copy_(torch.where(ok, ema_new, ema))
            t = torch.where(ok, t, step)
            update = torch.where(ok, update, 0)
        step.copy_(t)
        return update.to(G.dtype)

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, beta_sigma={self.beta_sigma}, eps={self.eps}, "
                f"{super().extra_repr()}")
