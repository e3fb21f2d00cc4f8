"""GradNorm (Chen et al., "GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep
Multitask Networks", ICML 2018)."""

from __future__ import annotations

import torch

from ._stateful import StatefulGramMethod

__all__ = ["GradNorm"]


class GradNorm(StatefulGramMethod):
    """Learned task weights ``w`` pulled toward ``w_i |g_i| = mean_j(w_j |g_j|) r_i^alpha``.

    Each call returns the current weights ``w`` (the update is ``w @ G``), then takes one step
    on the paper's loss ``L_grad = sum_i |w_i |g_i| - mean(w |g|) r_i^alpha|`` (target held
    constant), ``r_i = (L_i / L_i(0)) / mean_j(L_j / L_j(0))``:

    ``w_i <- w_i - lr |g_i| sign(w_i |g_i| - target_i) / mean_j |g_j|``, then
    ``w <- T max(w, 0) / sum(max(w, 0))`` (the paper's renormalization to sum T).

    The division by the mean gradient norm makes ``lr`` scale-free (the paper feeds the raw
    gradient to the network's optimizer). ``|g_i| = sqrt(K_ii)`` comes from the Gram the
    engine gives: by default all shared parameters (the paper uses the last shared layer;
    pass that layer's Gram to match it). ``L_i(0)`` are the first losses seen; without
    losses ``r_i = 1`` (pure gradient-norm equalization).

    State (buffers, created on first use): ``task_weights`` (ones at start), ``initial_losses``
    and ``has_initial``.
    """

    lazy_buffers = ("task_weights", "initial_losses", "has_initial")

    def __init__(self, *, alpha: float = 1.5, lr: float = 0.025, on_nonfinite: str = "raise"):
        super().__init__(on_nonfinite=on_nonfinite)
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.alpha = float(alpha)
        self.lr = float(lr)
        self.task_weights: torch.Tensor | None
        self.initial_losses: torch.Tensor | None
        self.has_initial: torch.Tensor | None

    def _weights(self, gram: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        shape = gram.shape[:-1]
        if self.task_weights is None:
            self.task_weights = torch.ones(shape, dtype=gram.dtype, device=gram.device)
            self.initial_losses = torch.ones(shape, dtype=gram.dtype, device=gram.device)
            self.has_initial = torch.zeros(shape[:-1] + (1,), dtype=torch.bool,
                                           device=gram.device)
        elif self.task_weights.shape != shape:
            raise ValueError(f"GradNorm keeps task weights of shape "
                             f"{tuple(self.task_weights.shape)}; got a Gram of shape "
                             f"{tuple(gram.shape)}")
        w = self.task_weights.to(gram.dtype)
        norms = gram.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
        weighted = w * norms
        target = weighted.mean(-1, keepdim=True)
        if losses is not None:
            losses = losses.to(gram.dtype).expand(shape)
            initial = torch.where(self.has_initial, self.initial_losses.to(gram.dtype), losses)
            self.initial_losses = self._keep_if_skipped(initial, self.initial_losses)
            self.has_initial = self._keep_if_skipped(
                torch.ones_like(self.has_initial), self.has_initial)
            ratio = torch.where(initial != 0, losses / initial, 1.0)
            mean_ratio = ratio.mean(-1, keepdim=True)
            rel = torch.where(mean_ratio > 0, ratio / mean_ratio, 1.0).clamp_min(0)
            target = target * rel.pow(self.alpha)
        mean_norm = norms.mean(-1, keepdim=True)
        step = norms * torch.sign(weighted - target) / torch.where(mean_norm > 0, mean_norm, 1.0)
        new = (w - self.lr * step).clamp_min(0)
        total = new.sum(-1, keepdim=True)
        new = torch.where(total > 0, new * (shape[-1] / total), 1.0)
        self.task_weights = self._keep_if_skipped(new, self.task_weights)
        return w

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, lr={self.lr}, {super().extra_repr()}"
