"""state_dict interop between a fused block and its plain loop definition.

A fused block lists, for each of its fused parameters, the loop's keys and the views of the
fused buffer they stand for (``_param_blocks``). ``state_dict`` then writes the loop's keys
(views of the fused storage) and ``load_state_dict`` assembles the fused parameters from
them, so checkpoints move both ways (the ``FusedHeads`` scheme, for a whole block).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Interop"]

Blocks = dict[str, list[tuple[str, torch.Tensor]]]


class Interop:
    """Mixin for an ``nn.Module`` with a ``_param_blocks() -> {fused name: [(loop key, view)]}``
    covering every parameter; call ``_register_interop()`` at the end of ``__init__``."""

    def _param_blocks(self) -> Blocks:  # pragma: no cover - each block defines it
        raise NotImplementedError

    def _register_interop(self) -> None:
        module: nn.Module = self  # type: ignore[assignment]
        module._register_state_dict_hook(_state_dict_hook)
        module._register_load_state_dict_pre_hook(_load_pre_hook, with_module=True)


def _state_dict_hook(module, state_dict, prefix, local_metadata):
    entries = {}
    for fused, blocks in module._param_blocks().items():
        value = state_dict.pop(prefix + fused)
        keep_vars = isinstance(value, nn.Parameter)
        for key, block in blocks:
            entries[key] = block if keep_vars else block.detach()
    for key, value in entries.items():  # in the loop definition's order (as listed)
        state_dict[prefix + key] = value
    return state_dict


def _load_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys,
                   unexpected_keys, error_msgs):
    """A missing loop key is reported under its own name; its block keeps its value."""
    for fused, blocks in module._param_blocks().items():
        parts = []
        for key, block in blocks:
            value = state_dict.pop(prefix + key, None)
            if value is None:
                missing_keys.append(prefix + key)
                value = block.detach()
            elif tuple(value.shape) != tuple(block.shape):
                error_msgs.append(f"size mismatch for {prefix + key}: checkpoint "
                                  f"{tuple(value.shape)}, model {tuple(block.shape)}")
                value = block.detach()
            parts.append(value.to(block.device).reshape(-1))
        state_dict[prefix + fused] = torch.cat(parts) if parts else torch.zeros(0)
