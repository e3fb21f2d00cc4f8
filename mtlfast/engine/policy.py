"""The non-finite policy of a step: ``"raise"``, ``"skip"``, or a GradScaler's. One object owns it.

- ``"raise"``: a NaN/Inf loss or gradient raises ``ValueError`` before anything is written
  (one host read per check).
- ``"skip"``: nothing is read back: the step's contribution is multiplied by a device flag
  (``torch.where``), ``StepInfo.skipped`` says so and no method state changes.
- a ``torch.amp.GradScaler``: the losses are scaled, the method sees unscaled gradients, and
  ``.grad`` holds the scaled update (NaN on overflow) so that ``scaler.step`` detects the
  overflow and skips, exactly as with ``scaler.scale(loss).backward()``.

With several processes the flag is agreed over the ranks first (an all-reduce on the device
for per-rank values), so every rank raises or skips together and replicas never drift apart.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .reduce import Reducer

__all__ = ["Policy", "check_scaler", "finite"]


def check_scaler(grad_scaler: object) -> torch.amp.GradScaler | None:
    """The scaler when enabled; None for None or a disabled one; TypeError otherwise."""
    if grad_scaler is None:
        return None
    if not isinstance(grad_scaler, torch.amp.GradScaler):
        raise TypeError(
            f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}"
        )
    return grad_scaler if grad_scaler.is_enabled() else None


def finite(*tensors: torch.Tensor | None,
           grads: Sequence[torch.Tensor | None] = ()) -> torch.Tensor:
    """0-d bool on the device: every tensor and every gradient is finite."""
    oks = [torch.isfinite(t).all() for t in tensors if t is not None]
    present = [g for g in grads if g is not None]
    if present:
        oks.append(torch.isfinite(torch.stack(torch._foreach_norm(present))).all())
    return torch.stack(oks).all()


class Policy:
    """The policy for one step, with the losses it scales and the reducer it agrees through."""

    def __init__(self, on_nonfinite: str, scaler: torch.amp.GradScaler | None,
                 reducer: Reducer) -> None:
        self.scaler = scaler
        self.reducer = reducer
        self.skip = on_nonfinite == "skip" or scaler is not None
        self.scale: torch.Tensor | None = None

    def scaled(self, losses: torch.Tensor) -> torch.Tensor:
        """The losses to differentiate (scaled under a GradScaler, which starts its scale)."""
        if self.scaler is None:
            return losses
        scaled = self.scaler.scale(losses)
        self.scale = self.scaler._scale.reshape(()).to(torch.float32)
        return scaled

    def unscale_gram(self, K: torch.Tensor) -> torch.Tensor:
        return K if self.scale is None else K / (self.scale * self.scale)

    def check(self, ok: torch.Tensor, what: Callable[[], str], *,
              per_rank: bool = False) -> torch.Tensor:
        """The flag agreed over the ranks; under "raise", ValueError (naming ``what()``, per
        rank) when it is False. Nothing has been written when this raises. ``per_rank``: the
        flag comes from this rank's values only (e.g. a micro-batch before any reduction)."""
        agreed = self.reducer.agree(ok, per_rank=per_rank)
        if self.skip or bool(agreed):
            return agreed
        local = None if bool(ok) else what()
        raise ValueError(
            f"mtlfast.backward: {self.reducer.explain(local, per_rank=per_rank)} contain NaN or "
            "Inf; nothing was written to .grad (pass on_nonfinite='skip' to zero such steps "
            "without a host sync)"
        )

    def marker(self, ok: torch.Tensor) -> torch.Tensor:
        """Multiplier of the update: 1 when finite; 0 (skip) or NaN (scaler: skip the step)."""
        bad = float("nan") if self.scaler is not None else 0.0
        return torch.where(ok, 1.0, bad)

    def weigh(self, w: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        """The weights the update is formed with (the marker folded in under skip/scaler)."""
        return w * self.marker(ok) if self.skip else w

    def mask(self, grads: Sequence[torch.Tensor | None], ok: torch.Tensor
             ) -> list[torch.Tensor | None]:
        """Gradients to write: zeros where skipped (a scaler's NaN must reach ``.grad``)."""
        if not self.skip or self.scaler is not None:
            return list(grads)
        return [None if g is None else torch.where(ok, g, 0.0) for g in grads]

    def reported(self, w: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        """The weights StepInfo reports (zeros for a skipped step)."""
        return torch.where(ok, w, 0.0) if self.skip and self.scaler is None else w
