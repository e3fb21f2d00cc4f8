"""ExcessMTL (He et al., "Robust Multi-Task Learning with Excess Risks", ICML 2024)."""

from __future__ import annotations

import torch

from ._simplex import check_int, check_real
from ._state import state_dtype
from .base import JacobianMethod, NonFinitePolicy

__all__ = ["ExcessMTL"]


class ExcessMTL(JacobianMethod):
    """Excess-risk weighting: ``alpha_i <- T alpha_i exp(eta e_i / e_i^0) / sum_j alpha_j
    exp(eta e_j / e_j^0)``, ``e_i = g_i^T H_i^-1 g_i``, ``H_i = diag(sqrt(sum_t g_i,t^2 + eps))``,
    ``d = alpha @ G``.

    The excess risk of task i is estimated by the quadratic model ``g_i^T H_i^-1 g_i`` with
    the diagonal AdaGrad preconditioner ``H_i`` (running sum of the task's squared gradients,
    buffer ``grad_sq_sum``, T x P, kept in at least float32). The first ``baseline_steps``
    steps keep ``alpha = 1`` and set ``e^0`` to the mean of their estimates
    (``initial_excess``; ``steps`` counts the steps taken); every later step multiplies
    ``alpha`` by ``exp(eta e_i / e_i^0)`` and renormalizes to sum T (``loss_weight``; the
    update uses the new ``alpha``). ``eta = robust_step_size = 1e-2``, ``eps = 1e-7`` and
    ``baseline_steps = 1`` (the first step's estimates, as the official code and LibMTL); for a
    baseline over 3 epochs (torchjd reads the paper's Appendix C.1 so) pass
    ``baseline_steps = 3 * len(loader)``.

    Where LibMTL would divide by zero (a task whose gradient was exactly 0 during the baseline,
    ``e_i^0 = 0``), the ratio is taken as 0: that task's weight changes only through the
    renormalization. The exponentiated update is applied in log space
    (``T softmax(log alpha + eta e / e^0)``, the same numbers), so large ratios saturate
    instead of overflowing.

    Deviation: LibMTL back-propagates ``sum_i alpha_i L_i``, so the task heads also get their
    gradients scaled by ``alpha_i``; here, as for every gradient method of the engine, the
    heads get their ordinary gradients and ``alpha`` weights the shared parameters' update.
    Needs the whole matrix (``needs = "jacobian"``): ``H_i`` is elementwise.
    """

    state_names = ("grad_sq_sum", "loss_weight", "initial_excess", "steps")
    deterministic = False

    def __init__(self, *, robust_step_size: float = 1e-2, eps: float = 1e-7,
                 baseline_steps: int = 1, on_nonfinite: NonFinitePolicy = "raise") -> None:
        super().__init__(on_nonfinite=on_nonfinite)
        self.robust_step_size = check_real("robust_step_size", robust_step_size, low=0.0)
        self.eps = check_real("eps", eps, low=0.0, low_open=True)
        self.baseline_steps = check_int("baseline_steps", baseline_steps, low=1)

    def _initial_state(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        dtype = state_dtype(like.dtype)
        T = like.shape[0]
        return {"grad_sq_sum": torch.zeros(like.shape, dtype=dtype, device=like.device),
                "loss_weight": torch.ones(T, dtype=dtype, device=like.device),
                "initial_excess": torch.zeros(T, dtype=dtype, device=like.device),
                "steps": torch.zeros((), dtype=torch.int64, device=like.device)}

    def _check_inputs(self, G: torch.Tensor, losses: torch.Tensor | None) -> None:
        if self.grad_sq_sum is not None and self.grad_sq_sum.shape != G.shape:
            raise ValueError(f"ExcessMTL accumulates squared gradients of shape "
                             f"{tuple(self.grad_sq_sum.shape)}; got G of shape {tuple(G.shape)} "
                             "(build a new method for another model)")

    @torch.no_grad()
    def _step(self, G, losses, state, proposal):
        acc, alpha = state["grad_sq_sum"], state["loss_weight"]
        steps, e0 = state["steps"], state["initial_excess"]
        g = G.to(acc.dtype)
        acc_new = torch.addcmul(acc, g, g)
        # e_i = sum_p g^2 / sqrt(S + eps): one T x P temporary, updated in place.
        excess = (acc_new + self.eps).rsqrt_().mul_(g).mul_(g).sum(-1)
        # The baseline: the running mean of the first baseline_steps estimates.
        in_baseline = steps < self.baseline_steps
        t = steps.to(acc.dtype)
        e0_new = torch.where(in_baseline, (e0 * t + excess) / (t + 1), e0)
        positive = e0_new > 0
        ratio = torch.where(positive, excess / torch.where(positive, e0_new, 1.0), 0.0)
        T = G.shape[0]
        moved = T * torch.softmax(torch.log(alpha) + self.robust_step_size * ratio, dim=0)
        alpha_new = torch.where(in_baseline, alpha, moved)
        update = alpha_new.to(G.dtype) @ G
        return update, {"grad_sq_sum": acc_new, "loss_weight": alpha_new,
                        "initial_excess": e0_new, "steps": steps + 1}

    def extra_repr(self) -> str:
        return (f"robust_step_size={self.robust_step_size}, eps={self.eps}, "
                f"baseline_steps={self.baseline_steps}, {super().extra_repr()}")
