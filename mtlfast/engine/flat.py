"""Flat buffers for the shared parameters: the (T, P) Jacobian and the (P,) gradient.

The Jacobian buffer is allocated once and reused across steps (no per-step ``torch.cat``). The
gradient buffer backs the shared parameters' ``.grad`` as views when their dtypes agree, so the
combined update ``w @ G`` is written by ONE ``ops.combine`` call. Any optimizer works on such
views; after ``zero_grad(set_to_none=True)`` the views are simply re-attached at the next step,
and a ``.grad`` the engine did not create is accumulated into in place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["SharedParams", "add_to_grads"]


class SharedParams:
    """The shared parameters laid out in one flat index space of size P."""

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self.params = list(params)
        self.numels = [p.numel() for p in self.params]
        self.offsets = [0]
        for n in self.numels:
            self.offsets.append(self.offsets[-1] + n)
        self.size = self.offsets[-1]
        self.device = self.params[0].device
        dtypes = {p.dtype for p in self.params}
        # One dtype for all: the flat .grad buffer can back every parameter's .grad.
        self.grad_dtype: torch.dtype | None = next(iter(dtypes)) if len(dtypes) == 1 else None
        #: dtype of temporaries holding a flat update (float64 only for float64 parameters).
        self.work_dtype = torch.float64 if torch.float64 in dtypes else torch.float32
        self._jacobian: torch.Tensor | None = None
        self._grad: torch.Tensor | None = None
        self._views: list[torch.Tensor] = []

    def same_as(self, params: Sequence[torch.Tensor]) -> bool:
        return len(params) == len(self.params) and all(
            a is b for a, b in zip(params, self.params, strict=True)
        )

    def slice(self, i: int) -> slice:
        return slice(self.offsets[i], self.offsets[i + 1])

    def jacobian(self, num_tasks: int, dtype: torch.dtype) -> torch.Tensor:
        """The reusable (T, P) buffer (contents are garbage until written)."""
        J = self._jacobian
        if J is None or J.shape[0] != num_tasks or J.dtype != dtype:
            self._jacobian = None  # free the old one before allocating
            J = torch.empty(num_tasks, self.size, dtype=dtype, device=self.device)
            self._jacobian = J
        return J

    def release(self) -> None:
        """Drop the Jacobian buffer (gramian / features steps do not need it)."""
        self._jacobian = None

    # -- gradients ---------------------------------------------------------------------------

    def _flat_grad(self) -> tuple[torch.Tensor, bool] | None:
        """The flat buffer backing every ``.grad`` and whether it already holds gradients
        (accumulate) or not (overwrite); None when some ``.grad`` is foreign."""
        if self.grad_dtype is None:
            return None
        if self._grad is None:
            self._grad = torch.zeros(self.size, dtype=self.grad_dtype, device=self.device)
            self._views = [
                self._grad[self.slice(i)].view(p.shape) for i, p in enumerate(self.params)
            ]
        missing = []
        for i, (p, v) in enumerate(zip(self.params, self._views, strict=True)):
            g = p.grad
            if g is None:
                missing.append(i)
            elif g is not v and not (
                g.data_ptr() == v.data_ptr() and g.shape == v.shape and g.stride() == v.stride()
            ):
                return None
        if len(missing) == len(self.params):
            return self._grad, False
        for i in missing:
            self._grad[self.slice(i)].zero_()
        return self._grad, True

    def _attach(self) -> None:
        for p, v in zip(self.params, self._views, strict=True):
            if p.grad is None:
                p.grad = v

    def add_flat(self, write: Callable[[torch.Tensor, bool], None]) -> None:
        """Add a flat (P,) update to the ``.grad`` fields.

        ``write(out, accumulate)`` writes (or adds, with ``accumulate``) the update into the
        1-D tensor ``out``; it is the flat gradient buffer when every ``.grad`` is one of its
        views or None, else a temporary that is then added parameter by parameter.
        """
        target = self._flat_grad()
        if target is not None:
            out, accumulate = target
            write(out, accumulate)
            self._attach()
            return
        tmp = torch.empty(self.size, dtype=self.work_dtype, device=self.device)
        write(tmp, False)
        self.add_list([tmp[self.slice(i)].view(p.shape) for i, p in enumerate(self.params)])

    def add_list(self, grads: Sequence[torch.Tensor | None]) -> None:
        """Add per-parameter updates (None: nothing for that parameter) to the ``.grad`` fields."""
        target = self._flat_grad()
        if target is not None:
            out, accumulate = target
            if not accumulate:
                out.zero_()
            views = [v for v, g in zip(self._views, grads, strict=True) if g is not None]
            torch._foreach_add_(views, [g for g in grads if g is not None])
            self._attach()
            return
        for p, g in zip(self.params, grads, strict=True):
            if g is None:
                continue
            if p.grad is None:
                p.grad = g.to(p.dtype).reshape(p.shape).clone()
            else:
                p.grad.add_(g.reshape(p.shape).to(p.grad.dtype))


def add_to_grads(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
    """``p.grad += g`` like autograd's accumulation (``p.grad = g`` when there is none)."""
    for p, g in zip(params, grads, strict=True):
        if g is None:
            continue
        if p.grad is None:
            p.grad = g
        else:
            p.grad.add_(g)
