"""``fuse_heads`` (plain heads -> FusedHeads, same weights) and ``unfuse`` (and back)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .module import _ACT_MODULES, FusedHeads

__all__ = ["fuse_heads", "unfuse"]


def _activation_of(module: nn.Module, where: str) -> str:
    for name, cls in _ACT_MODULES.items():
        if type(module) is cls:
            if name == "gelu" and module.approximate != "none":
                raise ValueError(f"{where}: only exact GELU (approximate='none') is fused")
            return name
    raise ValueError(f"{where}: expected ReLU, GELU, SiLU or Dropout between the two Linear "
                     f"layers, got {type(module).__name__}")


def _parse_head(name: str, head: nn.Module):
    """-> (first Linear, second Linear or None, activation, dropout p, has Dropout module)."""
    where = f"fuse_heads: head {name!r}"
    if isinstance(head, nn.Linear):
        return head, None, "none", 0.0, False
    if not isinstance(head, nn.Sequential) or len(head) < 2 \
            or not isinstance(head[0], nn.Linear) or not isinstance(head[-1], nn.Linear):
        raise ValueError(f"{where}: expected nn.Linear or nn.Sequential(Linear, [act], "
                         f"[Dropout], Linear), got {type(head).__name__}")
    activation, dropout, has_dropout = "none", 0.0, False
    for mid in list(head)[1:-1]:
        if isinstance(mid, nn.Dropout) and not has_dropout:
            dropout, has_dropout = mid.p, True
        elif activation == "none" and not has_dropout:
            activation = _activation_of(mid, where)
        else:
            raise ValueError(f"{where}: expected Sequential(Linear, [act], [Dropout], Linear), "
                             f"got {head}")
    return head[0], head[-1], activation, dropout, has_dropout


def _items(heads) -> tuple[list[tuple[str, nn.Module]], bool]:
    if isinstance(heads, (nn.ModuleDict, Mapping)):
        return list(heads.items()), False
    if isinstance(heads, (nn.ModuleList, Sequence)):
        return [(str(i), h) for i, h in enumerate(heads)], True
    raise TypeError(f"fuse_heads: expected nn.ModuleDict / nn.ModuleList (or dict / list) of "
                    f"heads, got {type(heads).__name__}")


def fuse_heads(heads) -> FusedHeads:
    """One :class:`FusedHeads` with the same weights as ``heads``.

    ``heads``: an ``nn.ModuleDict`` (or ``nn.ModuleList``, tasks named ``"0"``, ``"1"``, ...) of
    ``nn.Linear`` heads, or of ``nn.Sequential(Linear, act, [Dropout], Linear)`` heads with the
    same activation, dropout, bias setting, in_features, dtype and device. Hidden and output
    widths may differ per head. The state_dict keys of the result equal those of ``heads``.
    """
    items, from_list = _items(heads)
    if not items:
        raise ValueError("fuse_heads: got no heads")
    parsed = {name: _parse_head(name, head) for name, head in items}
    first = next(iter(parsed.values()))
    ref = first[0]
    for name, (l1, l2, act, p, has_dropout) in parsed.items():
        same = (l2 is None) == (first[1] is None) and act == first[2] and p == first[3] \
            and has_dropout == first[4] and l1.in_features == ref.in_features \
            and (l1.bias is None) == (ref.bias is None) and l1.weight.dtype == ref.weight.dtype \
            and l1.weight.device == ref.weight.device \
            and (l2 is None or (l2.bias is None) == (ref.bias is None))
        if not same:
            raise ValueError(f"fuse_heads: head {name!r} differs from head {items[0][0]!r} in "
                             "kind, activation, dropout, bias, in_features, dtype or device")
    mlp = first[1] is not None
    tasks = {name: (l2.out_features if mlp else l1.out_features)
             for name, (l1, l2, *_) in parsed.items()}
    fused = FusedHeads(
        ref.in_features, tasks,
        hidden=[l1.out_features for l1, *_ in parsed.values()] if mlp else None,
        activation=first[2], dropout=first[3], bias=ref.bias is not None,
        device=ref.weight.device, dtype=ref.weight.dtype)
    fused._second_index = 1 + (first[2] != "none") + first[4]
    fused._from_list = from_list
    source = {}
    for name, (l1, l2, *_) in parsed.items():
        layers = [(f"{name}.0", l1), (f"{name}.{fused._second_index}", l2)] if mlp \
            else [(name, l1)]
        for key, lin in layers:
            source[f"{key}.weight"] = lin.weight
            if lin.bias is not None:
                source[f"{key}.bias"] = lin.bias
    fused.load_state_dict({k: v.detach() for k, v in source.items()})
    return fused


def unfuse(fused: FusedHeads) -> nn.ModuleDict | nn.ModuleList:
    """Plain heads with copies of ``fused``'s weights: ``nn.Linear``, or ``nn.Sequential(Linear,
    act, [Dropout], Linear)``; a ModuleList when ``fused`` came from one."""
    ref = fused.weight if not fused.is_mlp else fused.weight1
    factory = {"device": ref.device, "dtype": ref.dtype}
    bias = (fused.bias if not fused.is_mlp else fused.bias1) is not None
    heads = {}
    for t, name in enumerate(fused.tasks):
        n = fused.out_widths[t]
        if not fused.is_mlp:
            heads[name] = nn.Linear(fused.in_features, n, bias=bias, **factory)
            continue
        h = fused.hidden_widths[t]
        layers = [nn.Linear(fused.in_features, h, bias=bias, **factory)]
        if fused.activation != "none":
            layers.append(_ACT_MODULES[fused.activation]())
        if fused._second_index - len(layers) == 1:
            layers.append(nn.Dropout(fused.dropout))
        layers.append(nn.Linear(h, n, bias=bias, **factory))
        heads[name] = nn.Sequential(*layers)
    out = nn.ModuleList(heads.values()) if getattr(fused, "_from_list", False) \
        else nn.ModuleDict(heads)
    with torch.no_grad():
        out.load_state_dict(fused.state_dict())
    out.train(fused.training)
    return out
