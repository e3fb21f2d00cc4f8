"""state_dict interop between a fused module and its plain per-task / loop definition.

A fused module (``FusedHeads``, the expert blocks of ``mtlfast.arch``) lists, for each of its
fused parameters, the unfused keys and the views of the fused buffer they stand for
(``_param_blocks``: row blocks, in storage order). ``state_dict`` then writes the unfused
keys (views of the fused storage) and ``load_state_dict`` assembles the fused parameters
from them, so checkpoints move both ways.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Interop"]

Blocks = dict[str, list[tuple[str, torch.Tensor]]]


class Interop:
    """Mixin for an ``nn.Module`` with a ``_param_blocks() -> {fused name: [(unfused key,
    view)]}`` covering every parameter; call ``_register_interop()`` at the end of
    ``__init__``."""

    def _param_blocks(self) -> Blocks:  # pragma: no cover - each module defines it
        raise NotImplementedError

    def _unfused_keys(self, keys: list[str]) -> list[str]:
        """The unfused keys in the unfused definition's ``state_dict`` order (default: as
        ``_param_blocks`` lists them)."""
        return keys

    def _register_interop(self) -> None:
        module: nn.Module = self  # type: ignore[assignment]
        module._register_state_dict_hook(_state_dict_hook)
        module._register_load_state_dict_pre_hook(_load_pre_hook, with_module=True)


def _state_dict_hook(module, state_dict, prefix, local_metadata):
    """Replace each fused entry by its views under the unfused keys."""
    entries = {}
    for fused, blocks in module._param_blocks().items():
        value = state_dict.pop(prefix + fused)
        keep_vars = isinstance(value, nn.Parameter)
        for key, block in blocks:
            entries[key] = block if keep_vars else block.detach()
    for key in module._unfused_keys(list(entries)):
        state_dict[prefix + key] = entries[key]
    return state_dict


def _load_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys,
                   unexpected_keys, error_msgs):
    """Assemble the fused parameters from the unfused keys of a checkpoint. A missing key is
    reported under its own (unfused) name and its block keeps its current value."""
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
        shape = module.get_parameter(fused).shape
        state_dict[prefix + fused] = torch.cat(parts).view(shape) if parts else \
            torch.zeros(shape)
