"""Shared machinery of the stateful Gram methods (Nash-MTL's cache, GradVac's EMA, GradNorm).

Their state tensors are buffers created on first use, when T (and the Gram's batch shape,
dtype and device) are known; ``load_state_dict`` into a fresh instance resizes them first.
Under ``on_nonfinite="skip"`` a skipped step must leave the state as it was: the base class
hands ``_weights`` a harmless stand-in Gram then and keeps the step's finiteness flag in
``_step_ok``, so every state write goes through :meth:`GramMethod._keep_if_skipped`.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .base import GramMethod


class StatefulGramMethod(GramMethod):
    """A Gram method with lazily shaped state buffers that survive ``state_dict`` round trips."""

    #: Names of the buffers created on first use (absent from ``state_dict`` before that).
    lazy_buffers: ClassVar[tuple[str, ...]] = ()
    deterministic: ClassVar[bool] = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in self.lazy_buffers:
            self.register_buffer(name, None)

    def stateful(self) -> bool:
        return True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        for name in self.lazy_buffers:
            saved = state_dict.get(prefix + name)
            if saved is not None:
                self._buffers[name] = torch.empty_like(saved)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
