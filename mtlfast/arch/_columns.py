"""Shared machinery of the column architectures (Cross-stitch, MTAN, LTB).

* A small ResNet (:func:`resnet`, :class:`BasicBlock`, :class:`Bottleneck`) with torchvision's
  / LibMTL's attribute names (``conv1 bn1 relu maxpool layer1..layer4``), the default encoder.
* :func:`split_stages`: the documented rule that turns an encoder into a list of stages.
* :class:`StackedColumns`: T copies of one stage run as ONE module on channel-stacked columns.

Channel-stacked layout: the T columns' activations ``(B, C, H, W)`` each live in one tensor
``(B, T*C, H, W)``, task ``t`` owning channels ``[t*C, (t+1)*C)``. The same memory viewed as
``(B, T, C, H, W)`` (per-task views, stitching) or ``(B*T, C, H, W)`` (a module shared by all
tasks) costs nothing. A stage is batched by copying its structure with every leaf replaced:

================  ============================================================================
per-task leaf     batched leaf (one module for the T columns)
================  ============================================================================
``Conv2d``        ``Conv2d(T*in, T*out, groups=T*groups)``, weights stacked along dim 0; on the
                  input every column shares (a stem) ``Conv2d(in, T*out)``, no replication
``BatchNorm2d``   ``BatchNorm2d(T*C)``: per-task statistics and running buffers, exactly
elementwise /     unchanged (``ReLU``, ``Sigmoid``, ``Identity``, ``Dropout``, pooling, ...):
pooling           they act on each channel independently
================  ============================================================================

Containers are batched when their ``forward`` only chains submodules and channel-independent
ops: ``nn.Sequential``, the ResNet blocks here, torchvision's and LibMTL's ``BasicBlock`` /
``Bottleneck``, and any class passed to :func:`register_batchable`. A stage holding anything
else (an arbitrary user module) falls back to a Python loop over T per-task modules
(``StackedColumns.batched`` is False), with the same state_dict keys. So does, by default, a
stage with convolutions of >= ``LOOP_CHANNELS`` (256) input channels per task, where T
separate convolutions beat one grouped convolution on a CPU (measured; see ``LOOP_CHANNELS``).

state_dict keys: a ``StackedColumns`` at ``prefix`` saves and loads the keys of a plain
``nn.ModuleList`` of the T per-task modules, ``{prefix}{t}.{path}`` (task by task), each value
block ``t`` of the stacked tensor along dim 0; ``num_batches_tracked`` (one per BatchNorm) is
saved once per task and loaded from task 0.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn

from .experts import compute_dtype

__all__ = ["BasicBlock", "Bottleneck", "StackedColumns", "register_batchable", "resnet",
           "split_stages"]


# ---------------------------------------------------------------------- the default encoder

def _conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1x1(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs), as torchvision's / LibMTL's."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet bottleneck block (1x1, 3x3, 1x1 convs), as torchvision's / LibMTL's."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * 4)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A ResNet trunk without pooling/fc: ``conv1 bn1 relu maxpool layer1..layer4`` (the
    attribute names of torchvision's ResNet and LibMTL's ``ResnetDilated``), initialised as
    torchvision's: convolutions ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``,
    BatchNorm weight 1 and bias 0."""

    def __init__(self, block=BasicBlock, layers=(2, 2, 2, 2), width: int = 64,
                 in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = width
        for i, n in enumerate(layers):
            planes, stride = width * 2 ** i, 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                down = None
                if j == 0 and (stride != 1 or inplanes != planes * block.expansion):
                    down = nn.Sequential(_conv1x1(inplanes, planes * block.expansion, stride),
                                         nn.BatchNorm2d(planes * block.expansion))
                blocks.append(block(inplanes, planes, stride if j == 0 else 1, down))
                inplanes = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.feature_dim = inplanes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def resnet(layers: Sequence[int] = (2, 2, 2, 2), width: int = 64, block: str = "basic",
           in_channels: int = 3) -> ResNet:
    """The default encoder: a ResNet trunk (ResNet-18 with the defaults, ``block="bottleneck"``
    and ``layers=(3, 4, 6, 3)`` for ResNet-50). Small ``width`` / ``layers=(1, 1, 1, 1)`` give
    tiny instances for tests and demos."""
    if block not in ("basic", "bottleneck"):
        raise ValueError(f"block must be 'basic' or 'bottleneck', got {block!r}")
    if len(layers) != 4 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1
                               for n in layers):
        raise ValueError(f"layers must be four positive ints, got {layers!r}")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive int, got {width!r}")
    return ResNet(BasicBlock if block == "basic" else Bottleneck, tuple(layers), width,
                  in_channels)


def split_stages(encoder) -> list[nn.Module]:
    """The stages of ``encoder``, by this rule:

    * a ResNet-like module (attributes ``conv1 bn1 relu maxpool layer1 layer2 layer3 layer4``:
      torchvision's ResNet, LibMTL's ``ResnetDilated``, :func:`resnet`) gives five stages,
      ``[Sequential(conv1, bn1, relu, maxpool), layer1, layer2, layer3, layer4]`` (LibMTL's
      split; the stem is stage 0);
    * an ``nn.Sequential``, ``nn.ModuleList``, list or tuple of modules gives its elements.

    The stages are the encoder's own modules (not copies).
    """
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
    if isinstance(encoder, nn.Module) and all(isinstance(getattr(encoder, n, None), nn.Module)
                                              for n in names):
        e = encoder
        return [nn.Sequential(e.conv1, e.bn1, e.relu, e.maxpool), e.layer1, e.layer2, e.layer3,
                e.layer4]
    if isinstance(encoder, (nn.Sequential, nn.ModuleList, list, tuple)):
        stages = list(encoder)
        if not stages:
            raise ValueError("encoder must have at least one stage, got an empty sequence")
        for i, s in enumerate(stages):
            if not isinstance(s, nn.Module):
                raise TypeError(f"encoder stage {i} must be an nn.Module, got "
                                f"{type(s).__name__}")
        return stages
    raise TypeError("encoder must be a ResNet-like nn.Module (conv1, bn1, relu, maxpool, "
                    "layer1..layer4), a sequence of stage modules, or a zero-argument callable "
                    f"returning one; got {type(encoder).__name__}")


def make_columns(encoder, num_tasks: int) -> list[list[nn.Module]]:
    """T columns of stages, ``columns[t][k]``: a callable ``encoder`` (a class or factory, as
    LibMTL's ``encoder_class``) is called T times (independent initialisations, as LibMTL);
    a list of T ResNet-like encoders is used as given; a module or a sequence of stages is
    deep-copied T times (the columns then start equal)."""
    if isinstance(encoder, (list, tuple)) and len(encoder) == num_tasks and \
            all(_looks_like_encoder(e) for e in encoder):
        cols = [split_stages(e) for e in encoder]
    elif callable(encoder) and not isinstance(encoder, nn.Module):
        cols = [split_stages(encoder()) for _ in range(num_tasks)]
    else:
        cols = [split_stages(copy.deepcopy(encoder)) for _ in range(num_tasks)]
    if len({len(c) for c in cols}) != 1:
        raise ValueError("encoder: the T columns have different numbers of stages")
    return cols


def _looks_like_encoder(e) -> bool:
    return isinstance(e, nn.Module) and all(
        isinstance(getattr(e, n, None), nn.Module) for n in ("conv1", "layer1", "layer4"))


# ---------------------------------------------------------------------- batching a stage

_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
                nn.Hardswish, nn.Hardsigmoid, nn.Identity, nn.Dropout, nn.Dropout2d,
                nn.MaxPool2d, nn.AvgPool2d, nn.Upsample)
_BATCHABLE: set[str] = {
    f"{__name__}.BasicBlock", f"{__name__}.Bottleneck",
    "torchvision.models.resnet.BasicBlock", "torchvision.models.resnet.Bottleneck",
    "LibMTL.model.resnet.BasicBlock", "LibMTL.model.resnet.Bottleneck",
}


def _qualname(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_batchable(cls: type) -> type:
    """Declare that ``cls.forward`` only chains its submodules with channel-independent ops
    (elementwise, residual adds, pooling), so T copies batch by batching the submodules.
    Usable as a class decorator."""
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"cls must be an nn.Module subclass, got {cls!r}")
    _BATCHABLE.add(_qualname(cls))
    return cls


def _batchable(m: nn.Module) -> bool:
    if isinstance(m, nn.Conv2d):
        return m.padding_mode == "zeros"
    if isinstance(m, nn.BatchNorm2d):
        return type(m) is nn.BatchNorm2d
    if isinstance(m, _ELEMENTWISE):
        return True
    if type(m) is nn.Sequential or _qualname(type(m)) in _BATCHABLE:
        own = list(m._parameters.values()) + list(m._buffers.values())
        return not any(v is not None for v in own) and all(_batchable(c) for c in m.children())
    return False


def _same_structure(mods: Sequence[nn.Module]) -> bool:
    ref = mods[0]
    shapes = [(k, v.shape, v.dtype) for k, v in ref.state_dict().items()]
    for m in mods[1:]:
        if repr(m) != repr(ref) or [(k, v.shape, v.dtype) for k, v in m.state_dict().items()] \
                != shapes:
            return False
    return True


class _SharedInputConv2d(nn.Conv2d):
    """T per-task convolutions of one shared input: ``Conv2d(in, T*out)`` (weights stacked)."""


def _stack(mods: Sequence[nn.Module], shared_input: bool) -> tuple[nn.Module, bool]:
    """One module for T same-structure modules; returns it and whether its input is still the
    shared (unstacked) tensor after it (True only for shared-input elementwise leaves)."""
    T, m = len(mods), mods[0]
    if isinstance(m, nn.Conv2d):
        w = torch.cat([c.weight.detach() for c in mods])
        shared = shared_input and m.groups == 1
        cls = _SharedInputConv2d if shared else nn.Conv2d
        cin = m.in_channels if shared else T * m.in_channels
        out = cls(cin, T * m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                  m.groups if shared else T * m.groups, m.bias is not None,
                  device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(w)
            if m.bias is not None:
                out.bias.copy_(torch.cat([c.bias.detach() for c in mods]))
        return out, False
    if isinstance(m, nn.BatchNorm2d):
        ref = m.running_mean if m.running_mean is not None else m.weight
        out = nn.BatchNorm2d(T * m.num_features, m.eps, m.momentum, m.affine,
                             m.track_running_stats, device=ref.device if ref is not None
                             else None, dtype=ref.dtype if ref is not None else None)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                if getattr(m, name) is not None:
                    getattr(out, name).copy_(torch.cat([getattr(c, name) for c in mods]))
            if m.num_batches_tracked is not None:
                out.num_batches_tracked.copy_(m.num_batches_tracked)
        out.train(m.training)
        return out, False
    if isinstance(m, _ELEMENTWISE):
        return copy.deepcopy(m), shared_input
    # a container: same class, children replaced
    out = copy.copy(m)
    out._parameters, out._buffers, out._modules = {}, {}, {}
    for name in m._modules:
        child = [getattr(c, name) for c in mods]
        if child[0] is None:
            out._modules[name] = None
            continue
        out._modules[name], shared_input = _stack(child, shared_input)
    # a block (not a Sequential) hides its dataflow: say its input must be stacked
    return out, shared_input if type(m) is nn.Sequential else False


def _needs_stacked_input(m: nn.Module) -> bool:
    """True when a shared input cannot be fed as is (a block's first op is not a stem conv)."""
    if isinstance(m, nn.Conv2d):
        return m.groups != 1
    if isinstance(m, _ELEMENTWISE):
        return False
    if type(m) is nn.Sequential:
        for c in m:
            if isinstance(c, _ELEMENTWISE):
                continue
            return _needs_stacked_input(c)
        return True  # only elementwise layers: repeat (cheap, and the layout is then stacked)
    return True


def _unstack(m: nn.Module, T: int) -> nn.Module:
    """A per-task module with the shapes of one column of the batched module ``m``."""
    if isinstance(m, nn.Conv2d):
        shared = isinstance(m, _SharedInputConv2d)
        ref = m.weight
        return nn.Conv2d(m.in_channels if shared else m.in_channels // T, m.out_channels // T,
                         m.kernel_size, m.stride, m.padding, m.dilation,
                         m.groups if shared else m.groups // T, m.bias is not None,
                         device=ref.device, dtype=ref.dtype)
    if isinstance(m, nn.BatchNorm2d):
        ref = m.running_mean if m.running_mean is not None else m.weight
        kw = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
        out = nn.BatchNorm2d(m.num_features // T, m.eps, m.momentum, m.affine,
                             m.track_running_stats, **kw)
        return out.train(m.training)
    if isinstance(m, _ELEMENTWISE):
        return copy.deepcopy(m)
    out = copy.copy(m)
    out._parameters, out._buffers = {}, {}
    out._modules = {k: None if c is None else _unstack(c, T) for k, c in m._modules.items()}
    return out


#: Per-task convolution input channels from which ``StackedColumns(batched=None)`` keeps a
#: stage as T separate modules. Measured on a CPU (oneDNN), fwd+bwd of one ResNet-18 stage,
#: grouped vs T separate modules: 512 channels (``layer4``) x0.66-0.78 at T=3 and 8, 256
#: channels (``layer3``) x0.97-1.0 at T=3 and x0.83 at T=8; narrower stages tie or win, and
#: win big for many narrow columns. At this width the loop's per-call overhead is negligible.
LOOP_CHANNELS = 256


def _widest_conv(m: nn.Module) -> int:
    return max((c.in_channels // c.groups for c in m.modules() if isinstance(c, nn.Conv2d)),
               default=0)


class StackedColumns(nn.Module):
    """T per-task copies of one stage as one module on channel-stacked columns.

    ``forward(x)``: ``x`` is ``(B, T*C_in, H, W)`` (task-major channel blocks), or, with
    ``shared_input=True``, one ``(B, C_in, H, W)`` tensor every column reads (a stem: its first
    convolution then runs once as ``Conv2d(C_in, T*C_out)``). Returns ``(B, T*C_out, H', W')``.

    ``batched=None`` (default): batched (``self.batched``) when every module inside is
    batchable (see the module docstring) and its convolutions are narrower than
    ``LOOP_CHANNELS`` input channels per task; otherwise a Python loop over the T modules
    (same keys, same results). ``True`` batches whenever possible (raises otherwise);
    ``False`` forces the loop.
    """

    def __init__(self, modules: Sequence[nn.Module], shared_input: bool = False,
                 batched: bool | None = None) -> None:
        super().__init__()
        mods = list(modules)
        if not mods:
            raise ValueError("modules must hold one module per task, got none")
        self.num_tasks = len(mods)
        self.shared_input = bool(shared_input)
        can = all(_batchable(m) for m in mods) and _same_structure(mods)
        if batched and not can:
            raise ValueError("modules cannot be batched (a module type outside the batchable "
                             "set, or columns that differ in structure); pass batched=None")
        if batched is None:
            self.batched = can and _widest_conv(mods[0]) < LOOP_CHANNELS
        else:
            self.batched = bool(batched)
        if self.batched:
            self._repeat = self.shared_input and _needs_stacked_input(mods[0])
            self.body, _ = _stack(mods, self.shared_input and not self._repeat)
        else:
            self._repeat = False
            self.body = nn.ModuleList(mods)
        self._register_state_dict_hook(_stacked_state_dict_hook)
        self._register_load_state_dict_pre_hook(_stacked_load_pre_hook, with_module=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = self.num_tasks
        if not self.batched:
            xs = [x] * T if self.shared_input else x.chunk(T, dim=1)
            return torch.cat([m(xi) for m, xi in zip(self.body, xs, strict=True)], dim=1)
        if self._repeat:
            x = x.repeat(1, T, 1, 1)
        return self.body(x)

    def unstack(self) -> nn.ModuleList:
        """The T per-task modules (copies; a plain ``nn.ModuleList``, same state_dict keys)."""
        if not self.batched:
            return copy.deepcopy(self.body)
        out = nn.ModuleList([_unstack(self.body, self.num_tasks) for _ in range(self.num_tasks)])
        out.load_state_dict(self.state_dict())
        return out

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, batched={self.batched}, " \
            f"shared_input={self.shared_input}"


def _tensors_of(module: StackedColumns):
    """(path under body, tensor) of every parameter and persistent buffer, in state order."""
    return [(k, v) for k, v in module.body.state_dict(keep_vars=True).items()]


def _stacked_state_dict_hook(module: StackedColumns, state_dict, prefix, local_metadata):
    T = module.num_tasks
    body = prefix + "body."
    keys = [k for k in state_dict if k.startswith(body)]
    values = {k: state_dict.pop(k) for k in keys}
    if not module.batched:
        for k in keys:  # body.{t}.path -> {t}.path
            state_dict[prefix + k[len(body):]] = values[k]
        return state_dict
    for t in range(T):
        for k in keys:
            v = values[k]
            path = k[len(body):]
            if path.endswith("num_batches_tracked"):
                state_dict[f"{prefix}{t}.{path}"] = v
            else:
                state_dict[f"{prefix}{t}.{path}"] = v.chunk(T, dim=0)[t]
    return state_dict


def _stacked_load_pre_hook(module: StackedColumns, state_dict, prefix, local_metadata, strict,
                           missing_keys, unexpected_keys, error_msgs):
    T = module.num_tasks
    if not module.batched:
        for k in [k for k in state_dict if k.startswith(prefix) and
                  k[len(prefix):].split(".", 1)[0].isdigit()]:
            state_dict[prefix + "body." + k[len(prefix):]] = state_dict.pop(k)
        return
    for path, current in _tensors_of(module):
        if path.endswith("num_batches_tracked"):
            vals = [state_dict.pop(f"{prefix}{t}.{path}", None) for t in range(T)]
            for t, v in enumerate(vals):
                if v is None:
                    missing_keys.append(f"{prefix}{t}.{path}")
            if vals[0] is not None:
                state_dict[prefix + "body." + path] = vals[0]
            continue
        blocks = current.detach().chunk(T, dim=0)
        parts = []
        for t in range(T):
            key = f"{prefix}{t}.{path}"
            v = state_dict.pop(key, None)
            if v is None:
                missing_keys.append(key)
                v = blocks[t]
            elif v.shape != blocks[t].shape:
                error_msgs.append(f"size mismatch for {key}: checkpoint {tuple(v.shape)}, "
                                  f"model {tuple(blocks[t].shape)}")
                v = blocks[t]
            parts.append(v.to(current.device))
        state_dict[prefix + "body." + path] = torch.cat(parts, dim=0)


# ---------------------------------------------------------------------- helpers

def mix_columns(x: torch.Tensor, weights: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """``out[:, t] = sum_j weights[t, j] x[:, j]`` on the stacked ``(B, T*C, H, W)`` layout."""
    B, TC = x.shape[:2]
    xs = x.reshape(B, num_tasks, TC // num_tasks, math.prod(x.shape[2:]))
    out = torch.einsum("tj,bjcp->btcp", weights.to(x.dtype), xs)
    return out.reshape(x.shape)


def per_task(x: torch.Tensor, num_tasks: int) -> list[torch.Tensor]:
    """The T per-task ``(B, C, H, W)`` views of a stacked ``(B, T*C, H, W)`` tensor."""
    return list(x.chunk(num_tasks, dim=1))


def check_images(name: str, module: nn.Module, x: object) -> None:
    """``x`` is what ``module``'s encoder reads: a floating ``(B, C, H, W)`` tensor, C its
    first convolution's input channels, on the parameters' device and in their dtype (or
    under autocast); else a TypeError / ValueError naming ``name``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: x must be floating point, got {x.dtype}")
    for m in module.modules():  # the first convolution, and the channels x gives it
        if isinstance(m, StackedColumns) and m.batched and m._repeat:
            # a stem without a leading convolution reads x repeated for the T columns
            conv = next(c for c in m.modules() if isinstance(c, nn.Conv2d))
            channels = conv.in_channels // m.num_tasks
            break
        if isinstance(m, nn.Conv2d):
            conv, channels = m, m.in_channels
            break
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{name}: x must be (batch, {channels}, height, width), got "
                         f"{tuple(x.shape)}")
    if x.device != conv.weight.device:
        raise ValueError(f"{name}: x is on {x.device} but the parameters are on "
                         f"{conv.weight.device}")
    compute_dtype(name, x, conv.weight)


def check_tasks(tasks) -> tuple[str, ...]:
    """``tasks``: a positive int T or a sequence of distinct task names (no '.')."""
    if isinstance(tasks, bool):
        raise TypeError("tasks must be a positive int or a sequence of task names, got bool")
    if isinstance(tasks, int):
        if tasks < 1:
            raise ValueError(f"tasks must be >= 1, got {tasks}")
        return tuple(str(t) for t in range(tasks))
    if isinstance(tasks, str) or not isinstance(tasks, Sequence):
        raise TypeError("tasks must be a positive int or a sequence of task names, got "
                        f"{type(tasks).__name__}")
    names = tuple(tasks)
    if not names:
        raise ValueError("tasks must name at least one task")
    for n in names:
        if not isinstance(n, str) or not n or "." in n:
            raise ValueError(f"tasks must be non-empty strings without '.', got {n!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"tasks has duplicate names: {list(names)}")
    return names


def out_channels(module: nn.Module, default: int | None = None) -> int | None:
    """Channels a ResNet-like stage outputs: the last registered BatchNorm2d's / Conv2d's."""
    last = default
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            last = m.num_features
        elif isinstance(m, nn.Conv2d):
            last = m.out_channels
    return last


# ---------------------------------------------------------------------- benchmark

def from_libmtl_columns(state_dict, tasks: Sequence[str], name: str, ours: str, keep: slice,
                        num_stages: int) -> dict:
    """A LibMTL ``_transform_resnet_cross`` / ``_transform_resnet_ltb`` state_dict (keys
    ``resnet_conv.{task}.*``, ``resnet_layer.{i}.{t}.*``, ``name``; a leading ``encoder.``, as
    in a whole LibMTL model, is dropped and decoder keys are ignored) under this package's
    keys: ``columns.0.{t}.*``, ``columns.{i+1}.{t}.*`` and ``ours = state_dict[name][keep]``."""
    if num_stages != 5:
        raise ValueError("LibMTL's column architectures have 5 ResNet stages; this model has "
                         f"{num_stages}")
    out = {}
    for key, value in state_dict.items():
        k = key[len("encoder."):] if key.startswith("encoder.") else key
        if k.startswith("decoders."):
            continue
        if k.startswith("resnet_conv."):
            task, rest = k[len("resnet_conv."):].split(".", 1)
            if task not in tasks:
                raise ValueError(f"state_dict: task {task!r} of the LibMTL checkpoint is not "
                                 f"one of this model's tasks {list(tasks)}")
            out[f"columns.0.{tasks.index(task)}.{rest}"] = value
        elif k.startswith("resnet_layer."):
            i, rest = k[len("resnet_layer."):].split(".", 1)
            out[f"columns.{int(i) + 1}.{rest}"] = value
        elif k == name:
            out[ours] = value[keep]
        else:
            out[k] = value  # load_state_dict reports it as unexpected
    return out
