"""Checking and normalizing what the user passes: losses, shared parameters, features.

Also one walk of the autograd graph per step that finds the non-shared leaves (the heads, which
get ordinary gradients) and proves every task reaches the shared parameters (and the features),
so a bad call fails with the task's name before anything is computed or written.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["GraphScan", "LossVector", "as_features", "as_losses", "as_shared", "check_call",
           "scan_graph"]


@dataclass
class LossVector:
    """The T losses as one 1-D tensor on the graph, with a name per task for messages."""

    values: torch.Tensor
    names: list[str]
    roots: list[object | None] | None  # per-task graph roots when they can be told apart
    given: list[torch.Tensor] = field(default_factory=list)  # the tensors the caller passed

    def refs(self) -> list[weakref.ref]:
        """Weak references to the caller's loss tensors (to recognize them next call)."""
        return [weakref.ref(t) for t in self.given]


def check_call(losses: LossVector, layout: object, consumed: Sequence[weakref.ref]) -> None:
    """Errors a user can make in the call itself, said plainly before anything runs."""
    device = layout.device
    if device.type == "meta":
        raise ValueError("shared parameters are on the meta device (not materialized): move "
                         "the model to a real device first, e.g. model.to_empty(device='cpu') "
                         "and initialize its parameters")
    if losses.values.device != device:
        raise ValueError(f"losses are on {losses.values.device}, shared parameters on {device}: "
                         "compute the losses on the parameters' device")
    if any(r() is t for r in consumed for t in losses.given):
        raise RuntimeError(
            "mtlfast.backward: trying to backward through the graph a second time: these losses "
            "were back-propagated by the previous call, which freed their graph (as "
            "loss.backward() does); pass retain_graph=True to that call to back-propagate them "
            "again")


def _no_graph_hint() -> str:
    if torch.is_inference_mode_enabled():
        return " (mtlfast.backward was called inside torch.inference_mode(): leave it)"
    if not torch.is_grad_enabled():
        return " (mtlfast.backward was called inside torch.no_grad(): leave it)"
    return (" (was the forward run under torch.no_grad() or torch.inference_mode(), or the "
            "loss .detach()-ed?)")


def as_losses(losses: object) -> LossVector:
    """Accept a sequence or dict of scalar tensors, or a 1-D tensor of T losses."""
    if isinstance(losses, torch.Tensor):
        if losses.dim() != 1 or losses.shape[0] == 0:
            raise ValueError(
                "losses: a tensor of losses must be 1-D with T > 0 entries, got shape "
                f"{tuple(losses.shape)} (pass a list of scalar losses instead)"
            )
        _check_floating(losses, "losses")
        names = [f"task {i}" for i in range(losses.shape[0])]
        if not losses.requires_grad:
            raise ValueError("losses: the loss tensor does not require grad (no graph to "
                             "differentiate)" + _no_graph_hint())
        return LossVector(losses, names, _stack_roots(losses), [losses])
    if isinstance(losses, Mapping):
        names, parts = [str(k) for k in losses], list(losses.values())
    elif isinstance(losses, Sequence):
        parts = list(losses)
        names = [f"task {i}" for i in range(len(parts))]
    else:
        raise TypeError(
            "losses must be a sequence or dict of scalar tensors, or a 1-D tensor, got "
            f"{type(losses).__name__}"
        )
    if not parts:
        raise ValueError("losses: got no losses (T = 0)")
    for name, loss in zip(names, parts, strict=True):
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"losses[{name!r}] must be a tensor, got {type(loss).__name__}")
        if loss.dim() != 0:
            raise ValueError(
                f"losses[{name!r}] must be a scalar (reduce it, e.g. .mean()), got shape "
                f"{tuple(loss.shape)}"
            )
        _check_floating(loss, f"losses[{name!r}]")
        if not loss.requires_grad:
            raise ValueError(f"losses[{name!r}] does not require grad: it is not connected to "
                             "any parameter" + _no_graph_hint())
    devices = {p.device for p in parts}
    if len(devices) > 1:
        raise ValueError(f"losses are on several devices: {sorted(map(str, devices))}")
    return LossVector(torch.stack(parts), names, [p.grad_fn for p in parts], parts)


def _check_floating(t: torch.Tensor, name: str) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {t.dtype}")


def _stack_roots(values: torch.Tensor) -> list[object | None] | None:
    # A 1-D tensor built by torch.stack still tells its tasks apart; any other op does not.
    fn = values.grad_fn
    if fn is not None and type(fn).__name__ == "StackBackward0":
        roots = [n for n, _ in fn.next_functions]
        if len(roots) == values.shape[0]:
            return roots
    return None


def as_shared(shared: object) -> list[torch.Tensor]:
    """The shared parameters as a duplicate-free list of leaf tensors that require grad."""
    if isinstance(shared, nn.Module):
        params = list(shared.parameters())
        where = f"the module {type(shared).__name__}"
    elif isinstance(shared, torch.Tensor):
        raise TypeError("shared must be an iterable of parameters or an nn.Module, got a tensor")
    elif isinstance(shared, Iterable):
        params = list(shared)
        where = "shared"
    else:
        raise TypeError(
            f"shared must be an iterable of parameters or an nn.Module, got {type(shared).__name__}"
        )
    unique: dict[int, torch.Tensor] = {}
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"shared[{i}] must be a tensor (a parameter), got {type(p).__name__}")
        if not p.requires_grad:
            raise ValueError(
                f"shared[{i}] (shape {tuple(p.shape)}) does not require grad; pass only the "
                "trainable shared parameters"
            )
        if not p.is_leaf:
            raise ValueError(f"shared[{i}] (shape {tuple(p.shape)}) is not a leaf tensor")
        if not p.is_floating_point():
            raise TypeError(f"shared[{i}] must be floating point, got {p.dtype}")
        unique.setdefault(id(p), p)
    if not unique:
        raise ValueError(f"shared is empty: {where} has no parameters")
    out = list(unique.values())
    devices = {p.device for p in out}
    if len(devices) > 1:
        raise ValueError(f"shared parameters are on several devices: {sorted(map(str, devices))}")
    return out


def as_features(features: object) -> tuple[torch.Tensor, ...] | None:
    """None, a tensor, or a tuple/list of tensors; each floating and on the graph."""
    if features is None:
        return None
    feats = (features,) if isinstance(features, torch.Tensor) else features
    if not isinstance(feats, (tuple, list)) or not feats:
        raise TypeError(
            "features must be a tensor or a non-empty tuple of tensors, got "
            f"{type(features).__name__}"
        )
    for i, z in enumerate(feats):
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"features[{i}] must be a tensor, got {type(z).__name__}")
        _check_floating(z, f"features[{i}]")
        if not z.requires_grad:
            raise ValueError(
                f"features[{i}] does not require grad: pass the trunk's output before any "
                ".detach() (the representation the heads read)"
            )
        if z.grad_fn is None:
            raise ValueError(
                f"features[{i}] is a leaf tensor: it is not on the graph of the shared parameters"
            )
    seen: dict[tuple[object, int], int] = {}
    for i, z in enumerate(feats):
        j = seen.setdefault((z.grad_fn, z.output_nr), i)
        if j != i:
            raise ValueError(f"features[{i}] is features[{j}] again: each path from the shared "
                             "parameters to the losses must be counted once")
    return tuple(feats)


@dataclass
class GraphScan:
    others: list[torch.Tensor]  # leaves that are not shared: they get ordinary gradients


def _describe(shared: Sequence[torch.Tensor], var: torch.Tensor) -> str:
    i = next(k for k, p in enumerate(shared) if p is var)
    return f"shared[{i}] (shape {tuple(var.shape)})"


def scan_graph(
    losses: LossVector,
    shared: Sequence[torch.Tensor],
    features: tuple[torch.Tensor, ...] | None,
    *,
    per_task: bool = False,
) -> GraphScan:
    """Walk the graph once: the non-shared leaves, and the checks that make a step exact:

    - each task reaches the shared parameters (through the features when they are given);
    - no feature is computed from another (that path would be counted twice);
    - no shared parameter sits between the features and the losses (its per-task gradients
      would be missed: it would get a zero update);
    - with ``per_task`` (and tasks that can be told apart, no features): no shared parameter is
      reached by one task only (a head passed as shared would get a re-weighted update).
    """
    shared_ids = {id(p) for p in shared}
    feature_bits: dict[object, int] = {}
    for i, z in enumerate(features or ()):
        feature_bits[z.grad_fn] = feature_bits.get(z.grad_fn, 0) | (1 << i)
    # reach[node] = (reaches a shared parameter, features at or below it); iterative post-order.
    reach: dict[object, tuple[bool, int]] = {}
    order: list[object] = []
    others: dict[int, torch.Tensor] = {}
    top = [losses.values.grad_fn] if losses.roots is None else list(losses.roots)
    stack: list[tuple[object, bool]] = [(n, False) for n in top if n is not None]
    while stack:
        node, expanded = stack.pop()
        if node in reach:
            continue
        children = [c for c, _ in node.next_functions if c is not None]
        if not expanded:
            stack.append((node, True))
            stack.extend((c, False) for c in children if c not in reach)
            continue
        var = getattr(node, "variable", None)
        hits_shared = var is not None and id(var) in shared_ids
        if var is not None and not hits_shared:
            others.setdefault(id(var), var)
        below = 0
        for c in children:
            s, f = reach[c]
            hits_shared |= s
            below |= f
        if node in feature_bits and below:
            inner = (below & -below).bit_length() - 1
            outer = (feature_bits[node] & -feature_bits[node]).bit_length() - 1
            raise ValueError(f"features[{outer}] is computed from features[{inner}]: pass only "
                             "the outermost representation the heads read (a nested one would "
                             "count the path through it twice)")
        reach[node] = (hits_shared, below | feature_bits.get(node, 0))
        order.append(node)
    if losses.roots is not None:
        for name, root in zip(losses.names, losses.roots, strict=True):
            s, f = reach.get(root, (False, 0)) if root is not None else (False, 0)
            if not s:
                raise ValueError(f"losses[{name!r}] is not connected to any shared parameter")
            if features is not None and not f:
                raise ValueError(f"losses[{name!r}] does not depend on the features")
    else:
        s, f = reach.get(losses.values.grad_fn, (False, 0))
        if not s:
            raise ValueError("losses are not connected to any shared parameter")
        if features is not None and not f:
            raise ValueError("losses do not depend on the features")
    if features is not None:
        for i, z in enumerate(features):
            if z.grad_fn not in reach:
                raise ValueError(f"features[{i}] is not on the graph of the losses")
            if not reach[z.grad_fn][0]:
                raise ValueError(f"features[{i}] is not computed from the shared parameters")
        _check_above_features(top, feature_bits, shared, shared_ids)
    elif per_task and losses.roots is not None and len(losses.roots) > 1:
        _check_single_task(losses, order, shared, shared_ids)
    return GraphScan(list(others.values()))


def _check_above_features(top: list, feature_bits: dict, shared: Sequence[torch.Tensor],
                          shared_ids: set[int]) -> None:
    """No shared parameter on a path from the losses that avoids the features."""
    seen: set[object] = set()
    stack = [n for n in top if n is not None]
    while stack:
        node = stack.pop()
        if node in seen or node in feature_bits:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)
        if var is not None and id(var) in shared_ids:
            raise ValueError(
                f"{_describe(shared, var)} is used between the features and the losses (in a "
                "head?): the per-task gradients through the features would miss it. Pass only "
                "the parameters that compute the features as shared (heads get their ordinary "
                "gradients automatically), or pass the representation after it as features")
        stack.extend(c for c, _ in node.next_functions if c is not None)


def _check_single_task(losses: LossVector, order: list, shared: Sequence[torch.Tensor],
                       shared_ids: set[int]) -> None:
    """No shared parameter reached by exactly one task (it is that task's head)."""
    tasks: dict[object, int] = {}
    for t, root in enumerate(losses.roots):
        if root is not None:
            tasks[root] = tasks.get(root, 0) | (1 << t)
    for node in reversed(order):  # reversed post-order: parents before children
        mask = tasks.get(node, 0)
        for c, _ in node.next_functions:
            if c is not None:
                tasks[c] = tasks.get(c, 0) | mask
        var = getattr(node, "variable", None)
        if var is not None and id(var) in shared_ids and mask and mask & (mask - 1) == 0:
            name = losses.names[mask.bit_length() - 1]
            raise ValueError(
                f"{_describe(shared, var)} is reached by the loss of task {name!r} only: it "
                "belongs to that task (a head), not to the shared trunk. Pass as shared only the "
                "parameters every task uses (e.g. MTLBackward(model.trunk, ...)); the heads get "
                "their ordinary gradients automatically")
