"""GradDrop (Chen et al., NeurIPS 2020, "Just Pick a Sign: Optimizing Deep Multitask Models
with Gradient Sign Dropout"), the combination step of Algorithm 1."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import ops
from ..ops.graddrop import PurityFn, graddrop_reference
from ._state import RandomStream, state_dtype
from .base import JacobianMethod, NonFinitePolicy

__all__ = ["GradDrop"]


class GradDrop(JacobianMethod):
    """GradDrop: keep, per coordinate, only the gradients of one sign, picked at random with
    probability given by the sign purity: ``d = sum_i (l_i + (1 - l_i) M_i) g_i`` with
    ``M_i = [P > U][g_i > 0] + [P < U][g_i < 0]``, ``P = (1 + sum g_i / sum |g_i|) / 2``,
    ``U ~ Uniform(0, 1)`` per coordinate (shared by all tasks); the paper allows a monotonically
    increasing ``f`` applied to P before the comparison (identity by default).

    Args:
        leak: ``l_i`` in [0, 1], one float for all tasks or one per task (paper default 0: no
            leak; ``l_i = 1`` lets task i's gradient through untouched).
        purity_fn: ``f``, elementwise on the purity tensor (None: identity, the fast path).
        seed: seed of the method's own generator (``U`` is ``torch.rand(P, generator=g)`` in
            float32, float64 for float64 G); None draws one from torch's global generator.
        on_nonfinite: "raise" (default) or "skip" (a zero update, no host read).

    A skipped or failed step leaves the generator where it was; on a CUDA device under the
    sync-free skip policy that decision reads the step's flag (one synchronization).

    Engine contract: ``needs = "jacobian"``; ``aggregate(G)`` on the ``(T, P)`` matrix of
    per-task gradients returns the ``(P,)`` update; one call per step draws one ``U``.
    The paper applies GradDrop to the gradients of a shared activation layer (summing purity
    over the batch); here it acts on whatever ``(T, P)`` matrix the engine passes (the shared
    parameters' gradients in jacobian mode). ``losses`` (optional) only enter the
    non-finite check.
    """

    deterministic = False

    def __init__(self, *, leak: float | Sequence[float] = 0.0,
                 purity_fn: PurityFn | None = None, seed: int | None = None,
                 on_nonfinite: NonFinitePolicy = "raise") -> None:
        super().__init__(on_nonfinite=on_nonfinite)
        leak_t = torch.as_tensor(leak, dtype=torch.float64)
        if leak_t.dim() > 1 or (leak_t.dim() == 1 and leak_t.numel() == 0):
            raise ValueError(f"leak must be a float or a non-empty sequence, got {leak!r}")
        if not bool(((leak_t >= 0) & (leak_t <= 1)).all()):
            raise ValueError(f"leak values must lie in [0, 1], got {leak!r}")
        self.register_buffer("leak", leak_t, persistent=False)  # a hyper-parameter
        if leak_t.dim() == 1:
            self.num_tasks = leak_t.numel()
        if purity_fn is not None and not callable(purity_fn):
            raise TypeError(f"purity_fn must be callable or None, got {type(purity_fn).__name__}")
        self.purity_fn = purity_fn
        self.rng = RandomStream(seed)

    @property
    def seed(self) -> int:
        return self.rng.seed

    def stateful(self) -> bool:
        return self.leak.dim() == 1

    def _check_inputs(self, G: torch.Tensor, losses: torch.Tensor | None) -> None:
        if self.leak.dim() == 1 and self.leak.numel() != G.shape[0]:
            raise ValueError(f"GradDrop has {self.leak.numel()} per-task leaks; got G with "
                             f"{G.shape[0]} tasks")

    @torch.no_grad()
    def _step(self, G, losses, state, proposal):
        u = self.rng.draw(proposal, G.device, lambda gen: torch.rand(
            G.shape[1], generator=gen, dtype=state_dtype(G.dtype), device=G.device))
        leak = self.leak.to(G.device).expand(G.shape[0])
        if self.purity_fn is None:
            return ops.graddrop(G.detach(), u, leak), {}
        return graddrop_reference(G.detach(), u, leak, self.purity_fn), {}

    def extra_repr(self) -> str:
        leak = self.leak.tolist()
        return f"leak={leak}, seed={self.seed}, {super().extra_repr()}"
