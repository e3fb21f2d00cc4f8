"""MoCo (Fernando et al., ICLR 2023, "Mitigating Gradient Bias in Multi-objective Learning: A
Provably Convergent Approach"): tracked gradients and a projected-gradient update of the task
weights, Algorithm 1."""

from __future__ import annotations

from typing import Literal

import torch

from ._state import state_dtype
from .base import JacobianMethod, NonFinitePolicy

__all__ = ["MoCo", "project_simplex"]


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row of ``v`` (..., T) onto the probability simplex.

    Sort-based (Duchi et al. 2008) with fixed shapes and no data-dependent branch: the largest
    k with ``u_k > (sum_{j<=k} u_j - 1) / k`` is counted with a mask (the condition holds on a
    prefix), so the projection runs where ``v`` lives without a host read. The projection is
    invariant to shifting all entries by one constant: shifting by the max keeps the k = 1
    condition exact (0 > -1) at any magnitude; the clamp only guards NaN rows.
    """
    T = v.shape[-1]
    v = v - v.max(dim=-1, keepdim=True).values
    u = torch.sort(v, dim=-1, descending=True).values
    excess = u.cumsum(-1) - 1
    k = torch.arange(1, T + 1, dtype=v.dtype, device=v.device)
    support = (u - excess / k > 0).sum(-1, keepdim=True).clamp_min(1)
    theta = excess.gather(-1, support - 1) / support.to(v.dtype)
    return (v - theta).clamp_min(0)


class MoCo(JacobianMethod):
    """MoCo: track each task's gradient, ``y_i <- y_i - beta_t (y_i - g_i)``, update the task
    weights ``lambda <- Proj_simplex(lambda - gamma_t (Y Y^T + rho I) lambda)`` and return
    ``d = lambda @ Y``, with ``beta_t = beta / t^beta_sigma``, ``gamma_t = gamma / t^gamma_sigma``
    (t = 1, 2, ... counts steps), ``y = 0`` and ``lambda = 1/T`` at the start.

    Args:
        beta, beta_sigma: tracking step size and its decay exponent (LibMTL defaults 0.5, 0.5).
        gamma, gamma_sigma: weight step size and its decay exponent (0.1, 0.5).
        rho: l2 regularization of the weight update (0).
        lambda_update: "simplex" (the paper: Euclidean projection onto the simplex) or
            "softmax" (the authors' code as shipped in LibMTL: ``lambda <- softmax(...)``).
        normalize_grads: the authors' code rescales each ``g_i`` to norm ``L_i`` before
            tracking (``g_i <- L_i g_i / (|g_i| + 1e-8)``); needs ``losses``. Off in the paper.
        on_nonfinite: "raise" (default) or "skip" (a zero update, state left unchanged).

    Engine contract: ``needs = "jacobian"``; ``aggregate(G, losses)`` once per step on the
    ``(T, P)`` per-task gradients returns the ``(P,)`` update and advances the state
    (``y``: T x P floats, kept in at least float32). T and P are fixed by the first call.
    """

    deterministic = False
    state_names = ("tracked", "task_weights", "step")

    def __init__(self, *, beta: float = 0.5, beta_sigma: float = 0.5, gamma: float = 0.1,
                 gamma_sigma: float = 0.5, rho: float = 0.0,
                 lambda_update: Literal["simplex", "softmax"] = "simplex",
                 normalize_grads: bool = False,
                 on_nonfinite: NonFinitePolicy = "raise") -> None:
        super().__init__(on_nonfinite=on_nonfinite)
        for name, value in (("beta", beta), ("gamma", gamma)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        for name, value in (("beta_sigma", beta_sigma), ("gamma_sigma", gamma_sigma),
                            ("rho", rho)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if lambda_update not in ("simplex", "softmax"):
            raise ValueError(f"lambda_update must be 'simplex' or 'softmax', got {lambda_update!r}")
        self.beta, self.beta_sigma = beta, beta_sigma
        self.gamma, self.gamma_sigma = gamma, gamma_sigma
        self.rho = rho
        self.lambda_update = lambda_update
        self.normalize_grads = normalize_grads

    def _initial_state(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        T, dtype = like.shape[0], state_dtype(like.dtype)
        return {"tracked": torch.zeros(like.shape, dtype=dtype, device=like.device),
                "task_weights": torch.full((T,), 1.0 / T, dtype=dtype, device=like.device),
                "step": torch.zeros((), dtype=dtype, device=like.device)}

    def _check_inputs(self, G: torch.Tensor, losses: torch.Tensor | None) -> None:
        if self.normalize_grads and losses is None:
            raise ValueError("MoCo(normalize_grads=True) needs the losses: aggregate(G, losses)")
        if self.tracked is not None and self.tracked.shape != G.shape:
            raise ValueError(f"MoCo tracks gradients of shape {tuple(self.tracked.shape)}; "
                             f"got G of shape {tuple(G.shape)} (build a new method for another "
                             "model)")

    @torch.no_grad()
    def _step(self, G, losses, state, proposal):
        y, lam, step = state["tracked"], state["task_weights"], state["step"]
        T = G.shape[0]
        # y <- (1 - beta_t) y + beta_t s_i g_i, s_i = 1 or L_i / (|g_i| + 1e-8): a new (T, P)
        # tensor, committed only once the step succeeded.
        scale = torch.ones(T, dtype=y.dtype, device=y.device)
        if self.normalize_grads:
            scale = losses.to(y.dtype) / (G.to(y.dtype).norm(dim=1) + 1e-8)
        t = step + 1
        beta_t = self.beta / t**self.beta_sigma
        gamma_t = self.gamma / t**self.gamma_sigma
        y_new = torch.addcmul(y * (1 - beta_t), G, (beta_t * scale)[:, None])
        lam_new = lam - gamma_t * (y_new @ (y_new.T @ lam) + self.rho * lam)
        lam_new = project_simplex(lam_new) if self.lambda_update == "simplex" \
            else torch.softmax(lam_new, dim=-1)
        update = (lam_new @ y_new).to(G.dtype)
        return update, {"tracked": y_new, "task_weights": lam_new, "step": t}

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, beta_sigma={self.beta_sigma}, gamma={self.gamma}, "
                f"gamma_sigma={self.gamma_sigma}, rho={self.rho}, "
                f"lambda_update={self.lambda_update!r}, normalize_grads={self.normalize_grads}, "
                f"{super().extra_repr()}")
