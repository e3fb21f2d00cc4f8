"""SDMGrad (Xiao et al., "Direction-oriented Multi-objective Learning: Simple and Provable
Stochastic Algorithms", NeurIPS 2023)."""

from __future__ import annotations

import torch

from ._simplex import (
    check_batch_count,
    check_batches,
    check_int,
    check_real,
    cross_gram,
    on_last_batch,
    project_simplex,
)
from ._state import state_dtype
from .base import GramMethod, NonFinitePolicy

__all__ = ["SDMGrad"]


class SDMGrad(GramMethod):
    """Stochastic direction-oriented MGDA: ``w = argmin_{w in simplex} 1/2 |G^T w + lamda g_0|^2``
    (``g_0`` the mean gradient), ``d = (w @ G + lamda g_0) / (1 + lamda)``.

    As LibMTL (from the official code): the Gram is scaled by ``1 / (s^2 + eps)`` with ``s``
    the mean gradient norm, and ``w`` (buffer ``inner_weights``, ``1/T`` at the start, kept
    across steps as a warm start) takes ``niter = 20`` projected heavy-ball steps,
    ``b <- momentum b + (K' w + lamda K' 1/T)`` (``b`` restarts at 0 every step, as a fresh
    ``torch.optim.SGD``), ``w <- Proj_simplex(w - lr b)``, with ``lr = 5``,
    ``momentum = 0.5``, ``eps = 1e-8``. The weights returned are
    ``(w + lamda / T) / (1 + lamda)`` (they sum to 1). ``lamda = 0.3`` is LibMTL's default
    (``SDMGrad_lamda``).

    ``batches=3`` is the paper's and LibMTL's step, exactly: each step takes the losses of three
    independent mini-batches ``xi1, xi2, zeta`` stacked batch-major, ``3T`` losses (all tasks
    on ``xi1``, then on ``xi2``, then on ``zeta``; LibMTL's SDMGrad reads ``zeta`` first),
    e.g. three forward passes and
    ``mtlfast.backward(torch.cat([losses_xi1, losses_xi2, losses_zeta]), shared, method)``.
    The inner problem (its scale too, from the diagonal of the block, clamped at 0) runs on
    the block ``G_xi1 G_xi2^T`` of the ``3T x 3T`` Gram (unbiased for ``E[G] E[G]^T``; not
    symmetric, as in LibMTL), and the weights are zeros on ``xi1, xi2`` and the ones above on
    ``zeta``, so the update is ``(w @ G_zeta + lamda mean(G_zeta)) / (1 + lamda)``.
    ``num_tasks`` then counts the ``3T`` losses. The heads (non-shared parameters) get the
    ordinary gradient of all ``3T`` losses, the three batches' summed (as LibMTL's). Not with
    ``mode="features"`` (ValueError, read by the engine from ``method.batches``): gradients
    with respect to different batches' features have zero products, so the block would be 0.

    ``batches=1`` (default): one mini-batch per step, used three times: the inner problem is
    solved on ``K = G G^T`` (which estimates ``E[G] E[G]^T`` plus the batch's gradient
    covariance, the bias the double sampling removes) and the update uses the same batch.
    The projection is exact (LibMTL runs it in numpy on the host; here it runs on the device).

    Not scale-homogeneous for gradient norms near ``sqrt(eps) = 1e-4`` or below (``eps`` is
    absolute, as in LibMTL).
    """

    state_names = ("inner_weights",)
    deterministic = False

    def __init__(self, *, lamda: float = 0.3, niter: int = 20, lr: float = 5.0,
                 momentum: float = 0.5, eps: float = 1e-8, batches: int = 1,
                 on_nonfinite: NonFinitePolicy = "raise") -> None:
        super().__init__(on_nonfinite=on_nonfinite)
        self.lamda = check_real("lamda", lamda, low=0.0)
        self.niter = check_int("niter", niter, low=1)
        self.lr = check_real("lr", lr, low=0.0, low_open=True)
        self.momentum = check_real("momentum", momentum, low=0.0, high=1.0, high_open=True)
        self.eps = check_real("eps", eps, low=0.0)
        self.batches = check_batches(batches)

    def check_tasks(self, num_tasks: int) -> None:
        check_batch_count("SDMGrad", num_tasks, self.batches)
        super().check_tasks(num_tasks)

    def _initial_state(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        T = like.shape[-1] // self.batches
        return {"inner_weights": torch.full((*like.shape[:-2], T), 1.0 / T,
                                            dtype=state_dtype(like.dtype), device=like.device)}

    def _step(self, gram, losses, state):
        K = cross_gram(gram, self.batches, "SDMGrad")
        w0 = state["inner_weights"]
        if w0.shape != K.shape[:-1]:
            raise ValueError(f"SDMGrad keeps weights of shape {tuple(w0.shape)}; got a Gram of "
                             f"shape {tuple(gram.shape)} (batches={self.batches})")
        T = K.shape[-1]
        scale = K.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt().mean(-1)
        A = K / (scale * scale + self.eps)[..., None, None]
        pull = self.lamda * A.mean(-1)
        w = w0.to(torch.float64)
        buf = torch.zeros_like(w)
        for _ in range(self.niter):
            buf = self.momentum * buf + (A @ w.unsqueeze(-1)).squeeze(-1) + pull
            w = project_simplex(w - self.lr * buf)
        out = (w + self.lamda / T) / (1 + self.lamda)
        return (on_last_batch(out.to(gram.dtype), self.batches),
                {"inner_weights": w.to(w0.dtype)})

    def extra_repr(self) -> str:
        return (f"lamda={self.lamda}, niter={self.niter}, lr={self.lr}, "
                f"momentum={self.momentum}, eps={self.eps}, batches={self.batches}, "
                f"{super().extra_repr()}")
