"""Multi-Task Attention Network (Liu et al., CVPR 2019) as LibMTL defines it, tasks batched.

One shared encoder, split into stages (:func:`mtlfast.arch.split_stages`): stage 0 (the stem,
LibMTL's ``shared_conv``), then layers ``i = 0 .. L-1`` (stages ``1 .. L``), each an
``nn.Sequential`` of blocks split as LibMTL does into ``g_i = layer[:-1](.)`` and
``f_i = layer[-1](g_i)``. Per task ``t`` and layer ``i``:

* ``mask = att_{i,t}(g_i)`` for ``i = 0``, else ``att_{i,t}(cat[g_i, a_t])``, where ``att`` is
  ``1x1 conv - BN - ReLU - 1x1 conv - BN - sigmoid`` (``C_in -> C_i // expansion -> C_i``);
* ``a_t = mask * f_i``; then, for ``i < L - 1``, ``a_t = block_att_i(a_t)``: ONE residual block
  shared by all tasks (``BasicBlock`` or ``Bottleneck`` by ``expansion``, ``C_i -> C_{i+1}``,
  stride 1, 1x1 conv + BN shortcut), and a 2x2 max-pool after layer 0, and before layer
  ``i > 0`` whenever ``a_t`` is larger than ``g_i`` (LibMTL's ``down_sampling``).

The output is ``[a_t]``, the T attended representations of the last layer.

Batched (:class:`MTAN`): the T attention modules of a layer are one module on channel-stacked
tasks ``(B, T*C, H, W)``: the first 1x1 conv is a dense ``Conv2d(C_g, T*mid)`` on the shared
``g_i`` plus a grouped (``groups=T``) 1x1 conv on the stacked ``a``; BN over ``T*mid`` / ``T*C``
channels; the second 1x1 conv grouped. The shared block ``block_att_i`` runs once on the tasks
folded into the batch (``(B*T, C, H, W)``, a free view) with its BatchNorm layers normalising
each task's columns with that task's batch statistics and updating the running statistics as
T sequential calls would (LibMTL calls the block once per task): exactly LibMTL's numbers, in
training and eval mode. :class:`MTANLoop` is the plain definition (LibMTL's loops).

state_dict keys (both classes; LibMTL's names, so a LibMTL ``_transform_resnet_MTAN``
checkpoint loads as is when the stages match):

===============================  ==============================================================
``shared_conv.*``                the stem
``shared_layer.{i}.0.*``         ``layer_i[:-1]``
``shared_layer.{i}.1.*``         ``layer_i[-1]``
``encoder_att.{i}.{t}.{j}.*``    task ``t``'s attention at layer ``i`` (``j`` in 0, 1, 3, 4: conv,
                                 BN, conv, BN); in :class:`MTAN` block ``t`` (dim 0) of the
                                 stacked tensors
``encoder_block_att.{i}.*``      the shared block after layer ``i``
===============================  ==============================================================

Shared parameters (``shared_parameters()``, LibMTL's ``get_share_params``): ``shared_conv`` and
``shared_layer``. The ``encoder_block_att`` blocks are also applied to every task but LibMTL
leaves them out (they get the ordinary summed gradient); ``shared_parameters(
include_block_att=True)`` adds them. The attention modules are task-specific.
``mode="features"`` (MGDA-UB) runs with ``features=`` the T outputs, but each task reads
only its own representation, so that Gram is diagonal: use ``"jacobian"`` / ``"gramian"``.
Not supported: LibMTL's multi-input mode (``forward_task``).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ._columns import (
    BasicBlock,
    Bottleneck,
    StackedColumns,
    check_images,
    check_tasks,
    out_channels,
    per_task,
    resnet,
    split_stages,
)

__all__ = ["MTAN", "MTANLoop"]


def _att_layer(cin: int, mid: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, mid, 1), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
                         nn.Conv2d(mid, cout, 1), nn.BatchNorm2d(cout), nn.Sigmoid())


def _block_att(cin: int, cout: int, expansion: int) -> nn.Module:
    down = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
    block = Bottleneck if expansion == 4 else BasicBlock
    return block(cin, cout // expansion, downsample=down)


class _Base(nn.Module):
    def _setup(self, tasks, encoder, expansion):
        self.tasks = check_tasks(tasks)
        if encoder is None:
            encoder = resnet()
        elif callable(encoder) and not isinstance(encoder, nn.Module):
            encoder = encoder()
        stages = split_stages(encoder)
        if len(stages) < 2:
            raise ValueError("encoder must have a stem and at least one layer (two stages)")
        for i, s in enumerate(stages[1:]):
            if not isinstance(s, nn.Sequential) or len(s) == 0:
                raise TypeError(f"encoder stage {i + 1} must be a non-empty nn.Sequential of "
                                f"blocks (MTAN splits it into [:-1] and [-1]), got "
                                f"{type(s).__name__}")
            if i > 0 and len(s) < 2:
                raise ValueError(f"encoder stage {i + 1} has one block: MTAN (as LibMTL) needs "
                                 "layers after the first to have >= 2 blocks, the last one "
                                 "keeping the spatial size")
        if expansion is None:
            expansion = 4 if hasattr(stages[1][-1], "conv3") else 1
        if expansion not in (1, 4):
            raise ValueError(f"expansion must be 1 (BasicBlock) or 4 (Bottleneck), got "
                             f"{expansion!r}")
        self.expansion = expansion
        self.shared_conv = stages[0]
        self.shared_layer = nn.ModuleDict({
            str(i): nn.ModuleList([s[:-1], s[-1]]) for i, s in enumerate(stages[1:])})
        prev = out_channels(stages[0])
        if prev is None:
            raise ValueError("encoder: cannot infer the stem's output channels (no Conv2d or "
                             "BatchNorm2d in stage 0)")
        self.channels, g_channels = [], []
        for s in stages[1:]:
            g_channels.append(out_channels(s[:-1], prev))
            prev = out_channels(s, prev)
            self.channels.append(prev)
        ch = self.channels
        for c in ch:
            if c % expansion:
                raise ValueError(f"encoder: layer channels {ch} must be divisible by "
                                 f"expansion={expansion}")
        att_in = [g_channels[0]] + [g_channels[i] + ch[i] for i in range(1, len(ch))]
        self.encoder_block_att = nn.ModuleList([_block_att(ch[i], ch[i + 1], expansion)
                                                for i in range(len(ch) - 1)])
        self._g_channels = g_channels
        return att_in

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def _new_att(self, att_in):
        T, e, ch = self.num_tasks, self.expansion, self.channels
        return [[_att_layer(att_in[i], ch[i] // e, ch[i]) for _ in range(T)]
                for i in range(len(ch))]

    def shared_parameters(self, include_block_att: bool = False) -> list[nn.Parameter]:
        """LibMTL's ``get_share_params``: ``shared_conv`` and ``shared_layer`` (and, with
        ``include_block_att``, the task-shared attention blocks)."""
        p = list(self.shared_conv.parameters()) + list(self.shared_layer.parameters())
        if include_block_att:
            p += list(self.encoder_block_att.parameters())
        return p

    def _stages(self) -> list[nn.Module]:
        return [self.shared_conv] + [nn.Sequential(*self.shared_layer[str(i)][0],
                                                   self.shared_layer[str(i)][1])
                                     for i in range(len(self.channels))]


class MTAN(_Base):
    """MTAN over a shared ``encoder`` with the T tasks' attention batched.

    Args:
        tasks: the number of tasks T, or their names.
        encoder: a ResNet-like module or a sequence of stages (used as is, not copied: MTAN
            shares it), or a zero-argument callable returning one; stages 1.. must be
            ``nn.Sequential`` of blocks. Channels are read from the stages (the last Conv2d /
            BatchNorm2d of each). Default :func:`mtlfast.arch.resnet` (ResNet-18).
        expansion: 1 or 4, the block type of the shared attention blocks and the attention
            bottleneck ratio (default: 4 if the encoder's blocks are Bottlenecks, as LibMTL).
    """

    def __init__(self, tasks, encoder=None, *, expansion: int | None = None) -> None:
        super().__init__()
        att_in = self._setup(tasks, encoder, expansion)
        self.encoder_att = nn.ModuleDict({
            str(i): StackedColumns(mods, shared_input=True, batched=True)
            for i, mods in enumerate(self._new_att(att_in))})

    def _attention(self, i: int, g: torch.Tensor, a: torch.Tensor | None) -> torch.Tensor:
        body = self.encoder_att[str(i)].body
        if a is None:
            return body(g)
        conv = body[0]
        cg, T = self._g_channels[i], self.num_tasks
        w = conv.weight
        y = F.conv2d(g, w[:, :cg], conv.bias) + F.conv2d(a, w[:, cg:].contiguous(), groups=T)
        return body[1:](y)

    def forward(self, x: torch.Tensor, stacked: bool = False):
        check_images(type(self).__name__, self, x)
        T = self.num_tasks
        s = self.shared_conv(x)
        a = None
        for i in range(len(self.channels)):
            g = self.shared_layer[str(i)][0](s)
            s = self.shared_layer[str(i)][1](g)
            if a is not None and a.shape[-2:] != g.shape[-2:]:
                a = F.max_pool2d(a, 2, 2)
            mask = self._attention(i, g, a)
            B, C = s.shape[:2]
            a = (mask.view(B, T, C, *s.shape[2:]) * s.unsqueeze(1)).view(B, T * C,
                                                                         *s.shape[2:])
            if i < len(self.channels) - 1:
                a = _shared_block(self.encoder_block_att[i], a, T)
            if i == 0:
                a = F.max_pool2d(a, 2, 2)
        if stacked:
            return a.view(a.shape[0], T, a.shape[1] // T, *a.shape[2:])
        return per_task(a, T)

    def unfuse(self) -> MTANLoop:
        """The equivalent :class:`MTANLoop` (copies; same state_dict)."""
        ref = MTANLoop(self.tasks, copy.deepcopy(self._stages()), expansion=self.expansion)
        ref.load_state_dict(self.state_dict())
        return ref.train(self.training)


class MTANLoop(_Base):
    """The plain definition (LibMTL's ``_transform_resnet_MTAN`` loops). Same arguments and
    state_dict keys as :class:`MTAN`."""

    def __init__(self, tasks, encoder=None, *, expansion: int | None = None) -> None:
        super().__init__()
        att_in = self._setup(tasks, encoder, expansion)
        self.encoder_att = nn.ModuleDict({str(i): nn.ModuleList(mods)
                                          for i, mods in enumerate(self._new_att(att_in))})

    def forward(self, x: torch.Tensor, stacked: bool = False):
        check_images(type(self).__name__, self, x)
        T, L = self.num_tasks, len(self.channels)
        s = self.shared_conv(x)
        att = [None] * T
        for i in range(L):
            g = self.shared_layer[str(i)][0](s)
            s = self.shared_layer[str(i)][1](g)
            for t in range(T):
                if i == 0:
                    mask = self.encoder_att[str(i)][t](g)
                else:
                    if g.shape[-2:] != att[t].shape[-2:]:
                        att[t] = F.max_pool2d(att[t], 2, 2)
                    mask = self.encoder_att[str(i)][t](torch.cat([g, att[t]], dim=1))
                att[t] = mask * s
                if i < L - 1:
                    att[t] = self.encoder_block_att[i](att[t])
                if i == 0:
                    att[t] = F.max_pool2d(att[t], 2, 2)
        return torch.stack(att, dim=1) if stacked else att


# ---------------------------------------------------------------------- shared block, T tasks

def _bn_per_task(bn: nn.BatchNorm2d, x: torch.Tensor, T: int) -> torch.Tensor:
    """``bn`` applied to each task's channel block of ``x`` (B, T*C, H, W) separately, as T
    sequential calls: per-task batch statistics, running statistics updated T times."""
    use_batch = bn.training or bn.running_mean is None
    w = None if bn.weight is None else bn.weight.repeat(T)
    b = None if bn.bias is None else bn.bias.repeat(T)
    if not use_batch:
        return F.batch_norm(x, bn.running_mean.repeat(T), bn.running_var.repeat(T), w, b,
                            False, 0.0, bn.eps)
    if not (bn.training and bn.track_running_stats and bn.running_mean is not None):
        return F.batch_norm(x, None, None, w, b, True, 0.0, bn.eps)
    C, rm, rv = bn.num_features, bn.running_mean, bn.running_var
    if bn.momentum is not None:
        # One call on T copies of the buffers gives slot t = (1-m) r + m mu_t; T sequential
        # calls give (1-m)^T r + sum_t (1-m)^(T-1-t) m mu_t: combine the slots.
        m = bn.momentum
        rmT, rvT = rm.repeat(T), rv.repeat(T)
        y = F.batch_norm(x, rmT, rvT, w, b, True, m, bn.eps)
        with torch.no_grad():
            decay = (1 - m) ** torch.arange(T - 1, -1, -1, device=rm.device,
                                            dtype=torch.float64)
            decay = decay.to(rm.dtype).unsqueeze(1)
            for run, slots in ((rm, rmT), (rv, rvT)):
                terms = slots.view(T, C) - (1 - m) * run
                run.mul_((1 - m) ** T).add_((decay * terms).sum(0))
            bn.num_batches_tracked.add_(T)
        return y
    with torch.no_grad():  # momentum=None: a cumulative average, 1/n per call
        xs = x.detach().transpose(0, 1).reshape(T, C, x.shape[0] * math.prod(x.shape[2:]))
        n = xs.shape[-1]
        mean = xs.mean(-1)
        var = xs.var(-1, unbiased=True) if n > 1 else torch.zeros_like(mean)
        count = int(bn.num_batches_tracked)
        for t in range(T):
            f = 1.0 / (count + t + 1)
            rm.mul_(1 - f).add_(f * mean[t])
            rv.mul_(1 - f).add_(f * var[t])
        bn.num_batches_tracked.add_(T)
    return F.batch_norm(x, None, None, w, b, True, 0.0, bn.eps)


def _shared_block(block: nn.Module, a: torch.Tensor, T: int) -> torch.Tensor:
    """One block shared by the T tasks on stacked ``a`` (B, T*C, H, W), exactly as T calls."""
    B = a.shape[0]

    def fold(y):
        return y.reshape(B * T, y.shape[1] // T, *y.shape[2:])

    def unfold(y):
        return y.reshape(B, y.shape[1] * T, *y.shape[2:])

    if not block.training:  # running statistics: the whole block on the folded batch
        return unfold(block(fold(a)))

    def cbn(conv, bn, y):
        return _bn_per_task(bn, unfold(conv(fold(y))), T)

    ds = block.downsample
    identity = a if ds is None else cbn(ds[0], ds[1], a)
    out = F.relu(cbn(block.conv1, block.bn1, a))
    if isinstance(block, Bottleneck):
        out = F.relu(cbn(block.conv2, block.bn2, out))
        out = cbn(block.conv3, block.bn3, out)
    else:
        out = cbn(block.conv2, block.bn2, out)
    return F.relu(out + identity)
