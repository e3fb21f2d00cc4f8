"""The plain loop definitions of the expert blocks (LibMTL / DeepCTR style): one
``nn.Sequential`` per expert, one ``Linear + Softmax`` per gate, Python loops over experts and
tasks. They are the reference the fused blocks are tested against, what ``unfuse()`` returns,
and the checkpoints the fused blocks load (their ``state_dict`` keys are these modules' keys).

Every ``forward(x)`` returns the per-task representations as one ``(T, *batch, D)`` tensor;
``fuse()`` returns the fused block with the same weights (the inverse of its ``unfuse()``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.gated_mixture import top_k_mask
from ._common import level_reach, resolve_tasks, specific_counts
from .experts import expert_widths, make_expert, normalize_activation
from .gates import check_top_k

__all__ = ["CGCLoop", "DSelectKLoop", "MMoELoop", "PLELoop", "TopKSoftmax", "smooth_step"]


class _Loop(nn.Module):
    """A loop definition that knows its fused twin: ``fuse()`` builds it with these weights."""

    _fused: str = ""

    def _remember(self, **config) -> None:
        self._config = config

    def fuse(self) -> nn.Module:
        """The equivalent fused block (``mtlfast.arch``), loaded from this module's weights."""
        from .. import arch

        p = next(self.parameters())
        fused = getattr(arch, self._fused)(**self._config, device=p.device, dtype=p.dtype)
        fused.load_state_dict(self.state_dict())
        return fused


class TopKSoftmax(nn.Module):
    """Softmax over each row's ``k`` largest logits, exactly 0 elsewhere (MMoE's ``top_k``)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(top_k_mask(logits, self.k), dim=-1)

    def extra_repr(self) -> str:
        return f"k={self.k}"


def _gate(in_features: int, n: int, bias: bool, factory, top_k: int | None = None
          ) -> nn.Sequential:
    select = nn.Softmax(dim=-1) if top_k is None else TopKSoftmax(top_k)
    return nn.Sequential(nn.Linear(in_features, n, bias=bias, **factory), select)


def _mix(experts_rep: torch.Tensor, selector: torch.Tensor) -> torch.Tensor:
    """LibMTL's ``einsum('ij..., ji -> j...')``: (E, B, D) x (B, E) -> (B, D)."""
    return torch.einsum("ij..., ji -> j...", experts_rep, selector)


class MMoELoop(_Loop):
    """LibMTL's MMoE: ``experts_shared`` (ModuleList), ``gate_specific`` (ModuleDict)."""

    _fused = "MMoE"

    def __init__(self, in_features, num_experts, expert_hidden, tasks, activation="relu",
                 gate_bias=True, device=None, dtype=None, top_k=None):
        super().__init__()
        self._remember(in_features=in_features, num_experts=num_experts,
                       expert_hidden=expert_hidden, tasks=tasks, activation=activation,
                       gate_bias=gate_bias, top_k=top_k)
        top_k = check_top_k(top_k, num_experts)
        f = {"device": device, "dtype": dtype}
        self.tasks = resolve_tasks(tasks)
        act = normalize_activation(activation)
        widths = expert_widths(expert_hidden, num_experts)
        self.experts_shared = nn.ModuleList([make_expert(in_features, w, act, **f)
                                             for w in widths])
        self.gate_specific = nn.ModuleDict({t: _gate(in_features, num_experts, gate_bias, f,
                                                     top_k) for t in self.tasks})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, x = x.shape[:-1], x.reshape(-1, x.shape[-1])
        rep = torch.stack([e(x) for e in self.experts_shared])
        z = torch.stack([_mix(rep, self.gate_specific[t](x)) for t in self.tasks])
        return z.reshape(len(self.tasks), *batch, z.shape[-1])

    def shared_parameters(self) -> list[nn.Parameter]:
        """The experts (LibMTL's ``get_share_params``)."""
        return list(self.experts_shared.parameters())


class _CGCLevel(nn.Module):
    """One CGC level: shared experts, task-specific experts, a gate per task over
    [shared, own] (LibMTL's order), and for inner PLE levels a shared gate over all experts in
    the order [shared, task 0's, task 1's, ...]."""

    def __init__(self, in_features, num_shared, counts, widths, tasks, act, gate_bias,
                 shared_gate, f):
        super().__init__()
        self.tasks = tasks
        it = iter(widths)
        self.experts_shared = nn.ModuleList([make_expert(in_features, next(it), act, **f)
                                             for _ in range(num_shared)])
        self.experts_specific = nn.ModuleDict({
            t: nn.ModuleList([make_expert(in_features, next(it), act, **f) for _ in range(k)])
            for t, k in zip(tasks, counts, strict=True)})
        self.gate_specific = nn.ModuleDict({t: _gate(in_features, num_shared + k, gate_bias, f)
                                            for t, k in zip(tasks, counts, strict=True)})
        if shared_gate:
            self.gate_shared = _gate(in_features, num_shared + sum(counts), gate_bias, f)

    def shared_parameters(self, reach: dict) -> list[nn.Parameter]:
        """The parameters every task reaches, given this level's ``level_reach`` entry."""
        everyone = frozenset(range(len(self.tasks)))
        out = list(self.experts_shared.parameters()) \
            if reach["shared_experts"] == everyone else []
        for i, t in enumerate(self.tasks):
            if reach["task_experts"][i] == everyone:
                out += self.experts_specific[t].parameters()
        if hasattr(self, "gate_shared") and reach["shared_gate"] == everyone:
            out += self.gate_shared.parameters()
        for i, t in enumerate(self.tasks):
            if reach["task_gates"][i] == everyone:
                out += self.gate_specific[t].parameters()
        return out

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """``inputs``: [shared, task 0, ...]; returns [shared (inner levels), task 0, ...]."""
        shared = [e(inputs[0]) for e in self.experts_shared]
        specific = {t: [e(inputs[1 + i]) for e in self.experts_specific[t]]
                    for i, t in enumerate(self.tasks)}
        out = []
        if hasattr(self, "gate_shared"):
            every = torch.stack(shared + [r for t in self.tasks for r in specific[t]])
            out.append(_mix(every, self.gate_shared(inputs[0])))
        for i, t in enumerate(self.tasks):
            rep = torch.stack(shared + specific[t])
            out.append(_mix(rep, self.gate_specific[t](inputs[1 + i])))
        return out


class CGCLoop(_Loop):
    """LibMTL's CGC: ``experts_shared``, ``experts_specific.{task}``, ``gate_specific.{task}``."""

    _fused = "CGC"

    def __init__(self, in_features, num_shared, num_specific, expert_hidden, tasks,
                 activation="relu", gate_bias=True, device=None, dtype=None):
        super().__init__()
        self._remember(in_features=in_features, num_shared=num_shared,
                       num_specific=num_specific, expert_hidden=expert_hidden, tasks=tasks,
                       activation=activation, gate_bias=gate_bias)
        self.tasks = resolve_tasks(tasks)
        counts = specific_counts(num_shared, num_specific, len(self.tasks))
        widths = expert_widths(expert_hidden, num_shared + sum(counts))
        level = _CGCLevel(in_features, num_shared, counts, widths, self.tasks,
                          normalize_activation(activation), gate_bias, False,
                          {"device": device, "dtype": dtype})
        self.experts_shared = level.experts_shared
        self.experts_specific = level.experts_specific
        self.gate_specific = level.gate_specific
        self._level = [level]  # not a submodule: its children are registered above
        self._reach = level_reach(1, num_shared, counts)

    def shared_parameters(self) -> list[nn.Parameter]:
        """The shared experts (LibMTL's ``get_share_params``: what every task reaches; with one
        task, everything)."""
        return self._level[0].shared_parameters(self._reach[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, x = x.shape[:-1], x.reshape(-1, x.shape[-1])
        z = torch.stack(self._level[0]([x] * (len(self.tasks) + 1)))
        return z.reshape(len(self.tasks), *batch, z.shape[-1])


class PLELoop(_Loop):
    """PLE (the paper's / DeepCTR's multi-level form): ``levels.{l}`` CGC levels; inner levels
    also carry ``gate_shared`` (over every expert of the level) whose output feeds the next
    level's shared experts; task experts of level l > 0 read their task's representation."""

    _fused = "PLE"

    def __init__(self, in_features, num_levels, num_shared, num_specific, expert_hidden, tasks,
                 activation="relu", gate_bias=True, device=None, dtype=None):
        super().__init__()
        self._remember(in_features=in_features, num_levels=num_levels, num_shared=num_shared,
                       num_specific=num_specific, expert_hidden=expert_hidden, tasks=tasks,
                       activation=activation, gate_bias=gate_bias)
        self.tasks = resolve_tasks(tasks)
        counts = specific_counts(num_shared, num_specific, len(self.tasks))
        if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 1:
            raise ValueError(f"num_levels must be an int >= 1, got {num_levels!r}")
        widths = expert_widths(expert_hidden, num_shared + sum(counts))
        act, f = normalize_activation(activation), {"device": device, "dtype": dtype}
        D = widths[0][-1]
        self.levels = nn.ModuleList([
            _CGCLevel(in_features if lvl == 0 else D, num_shared, counts, widths, self.tasks,
                      act, gate_bias, lvl < num_levels - 1, f) for lvl in range(num_levels)])
        self._reach = level_reach(num_levels, num_shared, counts)

    def shared_parameters(self) -> list[nn.Parameter]:
        """Everything every task reaches (see ``PLE.shared_parameters``): the shared experts,
        the inner levels' shared gates and task experts, the task gates of levels l < L - 2."""
        return [p for level, reach in zip(self.levels, self._reach, strict=True)
                for p in level.shared_parameters(reach)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, x = x.shape[:-1], x.reshape(-1, x.shape[-1])
        inputs = [x] * (len(self.tasks) + 1)
        for level in self.levels:
            inputs = level(inputs)
        z = torch.stack(inputs)
        return z.reshape(len(self.tasks), *batch, z.shape[-1])


def smooth_step(t: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """DSelect-k's smooth step: 0 below -gamma/2, 1 above gamma/2, a cubic in between."""
    return torch.where(t <= -gamma / 2, torch.zeros_like(t),
                       torch.where(t >= gamma / 2, torch.ones_like(t),
                                   (-2 / gamma ** 3) * t ** 3 + (3 / (2 * gamma)) * t + 0.5))


def binary_codes(num_experts: int) -> torch.Tensor:
    """(E, ceil(log2 E)) bool: expert e's binary code, most significant bit first. LibMTL and
    the official implementation build it as
    ``np.array([list(np.binary_repr(e, nb)) ...]).astype(bool)``: under NumPy 1.x (LibMTL pins
    1.26) '0' casts to False, but NumPy >= 2 casts any non-empty string to True, so there every
    expert gets the same code and the same weight. Built from integer bits here."""
    nb = math.ceil(math.log2(num_experts))
    shifts = torch.arange(nb - 1, -1, -1)
    return (torch.arange(num_experts)[:, None] >> shifts) & 1 == 1


class DSelectKLoop(_Loop):
    """LibMTL's DSelect-k: ``experts_shared``, ``_z_logits.{task}`` (Linear(K, k * nbits)),
    ``_w_logits.{task}`` (Linear(K, k)); without LibMTL's in-forward entropy regularizer, and
    with the paper's binary codes (``binary_codes``)."""

    _fused = "DSelectK"

    def __init__(self, in_features, num_experts, num_nonzeros, expert_hidden, tasks,
                 kgamma=1.0, activation="relu", device=None, dtype=None):
        super().__init__()
        self._remember(in_features=in_features, num_experts=num_experts,
                       num_nonzeros=num_nonzeros, expert_hidden=expert_hidden, tasks=tasks,
                       kgamma=kgamma, activation=activation)
        f = {"device": device, "dtype": dtype}
        self.tasks = resolve_tasks(tasks)
        widths = expert_widths(expert_hidden, num_experts)
        act = normalize_activation(activation)
        self.experts_shared = nn.ModuleList([make_expert(in_features, w, act, **f)
                                             for w in widths])
        self.num_nonzeros = num_nonzeros
        codes = binary_codes(num_experts)
        self.num_binary = codes.shape[1]
        self.register_buffer("_binary_codes", codes.to(device), persistent=False)
        self._z_logits = nn.ModuleDict({t: nn.Linear(in_features, num_nonzeros * self.num_binary,
                                                     **f) for t in self.tasks})
        self._w_logits = nn.ModuleDict({t: nn.Linear(in_features, num_nonzeros, **f)
                                        for t in self.tasks})
        with torch.no_grad():
            for p in self._z_logits.parameters():
                p.uniform_(-kgamma / 100, kgamma / 100)
            for p in self._w_logits.parameters():
                p.uniform_(-0.05, 0.05)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, x = x.shape[:-1], x.reshape(-1, x.shape[-1])
        rep = torch.stack([e(x) for e in self.experts_shared])
        out = []
        for t in self.tasks:
            logits = self._z_logits[t](x).reshape(-1, self.num_nonzeros, 1, self.num_binary)
            s = smooth_step(logits)
            selector = torch.where(self._binary_codes.unsqueeze(0), s, 1 - s).prod(3)
            weights = F.softmax(self._w_logits[t](x), dim=1)
            expert_weights = torch.einsum("ij, ij... -> i...", weights, selector)
            out.append(torch.einsum("ij, ji... -> i...", expert_weights, rep))
        z = torch.stack(out)
        return z.reshape(len(self.tasks), *batch, z.shape[-1])

    def shared_parameters(self) -> list[nn.Parameter]:
        """The experts (LibMTL's ``get_share_params``)."""
        return list(self.experts_shared.parameters())
