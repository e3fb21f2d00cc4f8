"""DB-MTL (Lin et al. 2023, "Dual-Balancing for Multi-Task Learning"): log-loss gradients,
tracked with an EMA and rescaled to the largest norm."""

from __future__ import annotations

import torch

from ._state import state_dtype
from .base import JacobianMethod, NonFinitePolicy

__all__ = ["DBMTL"]


class DBMTL(JacobianMethod):
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
    state_names = ("ema", "step")

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

    def _initial_state(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        dtype = state_dtype(like.dtype)
        return {"ema": torch.zeros(like.shape, dtype=dtype, device=like.device),
                "step": torch.zeros((), dtype=dtype, device=like.device)}

    def _check_inputs(self, G: torch.Tensor, losses: torch.Tensor | None) -> None:
        if losses is None:
            raise ValueError("DBMTL needs the losses (gradients of log-losses): "
                             "aggregate(G, losses)")
        if self.ema is not None and self.ema.shape != G.shape:
            raise ValueError(f"DBMTL tracks gradients of shape {tuple(self.ema.shape)}; "
                             f"got G of shape {tuple(G.shape)} (build a new method for another "
                             "model)")

    @torch.no_grad()
    def _step(self, G, losses, state, proposal):
        ema, step = state["ema"], state["step"]
        t = step + 1
        beta_t = self.beta / t**self.beta_sigma
        # m <- beta_t m + (1 - beta_t) g_i / (L_i + eps): a new (T, P) tensor, committed only
        # once the step succeeded.
        coef = (1 - beta_t) / (losses.to(ema.dtype) + self.eps)
        ema_new = torch.addcmul(ema * beta_t, G, coef[:, None])
        norms = ema_new.norm(dim=1)
        alpha = norms.max() / (norms + 1e-8)
        return (alpha @ ema_new).to(G.dtype), {"ema": ema_new, "step": t}

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, beta_sigma={self.beta_sigma}, eps={self.eps}, "
                f"{super().extra_repr()}")
