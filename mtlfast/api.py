"""The training API: ``mtlfast.backward(losses, shared, method)`` in place of ``loss.backward()``.

One call computes the per-task gradients of the shared parameters (batched), the method's
weights from their Gram ``K = G G^T`` on the device, and writes the combined update ``w @ G``
into the shared parameters' ``.grad``; every other parameter (the heads) gets its ordinary
gradient of ``sum_t L_t``. Existing ``.grad`` is accumulated into, like ``loss.backward()``.
Then ``optimizer.step()`` as usual.

This module is a facade: it checks the options into an :class:`~mtlfast.engine.EngineConfig`,
picks the reducer (one process, or DDP through ``mtlfast.distributed``) and hands each call to
the pipeline in ``mtlfast.engine``. The user guide (docs/user-guide.md) covers the modes, the
non-finite policy, AMP, distributed training and capturing a step in a CUDA graph.
"""

from __future__ import annotations

import atexit
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from . import methods
from .distributed.sync import reject_sharded
from .engine import (
    DEFAULT_BUCKET_CAP_MB,
    DEFAULT_JACOBIAN_BUDGET,
    DistributedMode,
    Engine,
    EngineConfig,
    Mode,
    NonFinite,
    Reducer,
    StepInfo,
    Strategy,
    as_shared,
)
from .methods import Method

__all__ = ["Losses", "MTLBackward", "Mode", "StepInfo", "backward"]

#: The T losses: a mapping task name -> scalar tensor, a sequence of scalar tensors, or a 1-D
#: tensor of T losses.
Losses = Mapping[str, torch.Tensor] | Sequence[torch.Tensor] | torch.Tensor
#: The shared parameters: the trunk module, or an iterable of its parameters.
Shared = nn.Module | Iterable[torch.Tensor]
#: The shared representation(s) Z the heads read: a tensor or a tuple of tensors.
Features = torch.Tensor | Sequence[torch.Tensor] | None


_DEFAULT: list[Method] = []


def _method(method: object) -> Method:
    """A method object: None -> the shared default UPGrad(), a name -> methods.get(name)."""
    if method is None:
        if not _DEFAULT:
            _DEFAULT.append(methods.UPGrad())
        return _DEFAULT[0]
    if isinstance(method, str):
        return methods.get(method)
    if isinstance(method, type) and issubclass(method, Method):
        raise TypeError(f"method must be a method object, got the class {method.__name__}: "
                        f"pass {method.__name__}(...)")
    if not isinstance(method, Method):
        raise TypeError(f"method must be a mtlfast.methods.Method or a method name (one of "
                        f"mtlfast.methods.available()), got {type(method).__name__}")
    return method


def _reducer(config: EngineConfig, shared: list[torch.Tensor]) -> Reducer:
    if config.process_group is None:
        return Reducer(shared)
    from .distributed import DataParallel

    return DataParallel(shared, config.process_group, config.distributed_mode,
                        bucket_cap_mb=config.bucket_cap_mb)


class MTLBackward(nn.Module):
    """``mtlfast.backward`` as an object: keeps the flat buffers, the method and its state.

    Args:
        shared: the shared parameters (an iterable, or the trunk ``nn.Module``): the ones every
            task uses; heads and any other parameter get their ordinary gradients.
        method: a ``mtlfast.methods`` method, or its name (``mtlfast.methods.get``; default
            ``UPGrad()``).
        mode: ``"jacobian"`` (G in one flat (T, P) buffer), ``"gramian"`` (K streamed per
            parameter, G never whole, then one weighted backward), ``"features"`` (K of dL/dZ
            only: the MGDA-UB approximation, about the cost of ordinary training) or ``"auto"``
            (jacobian while the (T, P) buffer fits ``jacobian_budget``, else gramian).
        chunk_size: at most this many tasks per batched backward (caps memory; None: all T).
        jacobian_dtype: dtype of the (T, P) buffer (default float32, float64 for float64
            parameters; bfloat16 halves its memory).
        jacobian_budget: bytes a (T, P) Jacobian may take before mode="auto" picks gramian.
        on_nonfinite: ``"raise"`` (ValueError before anything is written; one host read per
            step) or ``"skip"`` (no host read: the step is zeroed and reported in
            ``StepInfo.skipped``; no method state changes).
        process_group: a ``torch.distributed`` group the model is data-parallel over (DDP; run
            its forward under ``mtlfast.distributed.no_sync``); None: one process.
        distributed_mode: ``"exact"`` (all-reduce G, the global batch's step) or ``"local"``
            (per-rank projection, averaged update; ordinary DDP volume).
        bucket_cap_mb: exact mode: MiB of the (T, P) Jacobian per all-reduce bucket, each
            started during the backward once written (default 25, like DDP; None: one
            all-reduce in place after the backward).
        vjp: how the T per-task backward passes run: ``"batched"`` (one vmapped backward),
            ``"loop"`` (T ordinary backward passes) or ``"auto"`` (batched on accelerators; on
            a CPU both are timed over the first eight steps and the faster kept). The values
            are the same either way, to rounding. With ``process_group``, ``"auto"`` means
            ``"batched"``.
        accumulate: micro-batches per step (exact accumulation, jacobian mode): each call
            adds its micro-batch's per-task gradients, losses and heads' gradients to running
            sums, and every ``accumulate``-th call weighs their mean and writes the update, equal
            to one batch of ``accumulate`` x B (equal micro-batch sizes). ``backward(...,
            step=True)`` steps early (a short last group), ``step=False`` only accumulates.
    """

    def __init__(
        self,
        shared: Shared,
        method: Method | str | None = None,
        *,
        mode: Mode = "auto",
        chunk_size: int | None = None,
        jacobian_dtype: torch.dtype | None = None,
        jacobian_budget: int = DEFAULT_JACOBIAN_BUDGET,
        on_nonfinite: NonFinite = "raise",
        process_group: object = None,
        distributed_mode: DistributedMode = "exact",
        bucket_cap_mb: float | None = DEFAULT_BUCKET_CAP_MB,
        vjp: Strategy = "auto",
        accumulate: int = 1,
    ) -> None:
        super().__init__()
        self._build(shared, method, EngineConfig(
            mode=mode, chunk_size=chunk_size, jacobian_dtype=jacobian_dtype,
            jacobian_budget=jacobian_budget, on_nonfinite=on_nonfinite,
            process_group=process_group, distributed_mode=distributed_mode,
            bucket_cap_mb=bucket_cap_mb, vjp=vjp, accumulate=accumulate))

    def _build(self, shared: Shared, method: Method | str | None,
               config: EngineConfig) -> None:
        self._method_name = method if isinstance(method, str) else None
        self.method = _method(method)
        self.config = config
        params = as_shared(shared)
        reject_sharded(params)
        self._engine = Engine(self.method, config, _reducer(config, params))

    @classmethod
    def from_config(cls, shared: Shared, method: Method | str | None,
                    config: EngineConfig) -> MTLBackward:
        """An engine built from an already checked :class:`~mtlfast.engine.EngineConfig`."""
        engine = cls.__new__(cls)
        nn.Module.__init__(engine)
        engine._build(shared, method, config)
        return engine

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, value)
        if name == "method" and "_engine" in self.__dict__:
            self._engine.method = _method(value)

    # Read-only views of the options and the engine's parts.
    mode = property(lambda self: self.config.mode)
    chunk_size = property(lambda self: self.config.chunk_size)
    on_nonfinite = property(lambda self: self.config.on_nonfinite)
    jacobian_budget = property(lambda self: self.config.jacobian_budget)
    vjp = property(lambda self: self._engine.vjp)
    _shared = property(lambda self: self._engine.reducer.layout())
    _heads = property(lambda self: self._engine.heads)
    _trunk = property(lambda self: self._engine.trunk)

    @property
    def jacobian_dtype(self) -> torch.dtype:
        return self._engine.jacobian_dtype(self._shared)

    @property
    def shared(self) -> list[torch.Tensor]:
        return self._shared.params

    def resolve_mode(self, num_tasks: int, has_features: bool) -> str:
        """The mode a step with T tasks runs in; ValueError for a combination that cannot run."""
        return self._engine.resolve_mode(num_tasks, has_features)

    def backward(
        self,
        losses: Losses,
        features: Features = None,
        *,
        retain_graph: bool = False,
        grad_scaler: torch.amp.GradScaler | None = None,
        step: bool | None = None,
    ) -> StepInfo:
        """Write the step's gradients into ``.grad`` (accumulating) and report what it computed.

        A call that raises, or that the non-finite policy skips, leaves ``.grad``, the method's
        state and the engine's state as they were. ``step``: see ``accumulate``.
        """
        return self._engine.backward(losses, features, retain_graph=retain_graph,
                                     grad_scaler=grad_scaler, step=step)


_CACHE: list[MTLBackward] = []
# The cached engine may hold a process group: release it while the interpreter is whole, since
# gloo aborts the process when a group is destroyed during interpreter shutdown.
atexit.register(_CACHE.clear)


def backward(
    losses: Losses,
    shared: Shared,
    method: Method | str | None = None,
    features: Features = None,
    mode: Mode = "auto",
    retain_graph: bool = False,
    grad_scaler: torch.amp.GradScaler | None = None,
    *,
    chunk_size: int | None = None,
    jacobian_dtype: torch.dtype | None = None,
    jacobian_budget: int = DEFAULT_JACOBIAN_BUDGET,
    on_nonfinite: NonFinite = "raise",
    process_group: object = None,
    distributed_mode: DistributedMode = "exact",
    bucket_cap_mb: float | None = DEFAULT_BUCKET_CAP_MB,
    vjp: Strategy = "auto",
    accumulate: int = 1,
) -> StepInfo:
    """Multi-task ``loss.backward()``: ``.grad`` of ``shared`` += ``w @ G``, heads += their grads.

    ``G`` (T x P) holds the per-task gradients of the shared parameters, ``w`` the method's
    weights (UPGrad by default, Quinton & Rey 2024) from ``K = G G^T``. See ``MTLBackward`` for
    the options; the last engine built here is reused while ``shared`` and the options stay
    the same (a new ``method`` object just replaces the old one), so its (T, P) buffer is
    allocated once.
    """
    config = EngineConfig(mode=mode, chunk_size=chunk_size, jacobian_dtype=jacobian_dtype,
                          jacobian_budget=jacobian_budget, on_nonfinite=on_nonfinite,
                          process_group=process_group, distributed_mode=distributed_mode,
                          bucket_cap_mb=bucket_cap_mb, vjp=vjp, accumulate=accumulate)
    params = as_shared(shared)
    engine = _CACHE[0] if _CACHE else None
    if engine is None or engine.config.key() != config.key() \
            or not engine._shared.same_as(params):
        _CACHE.clear()  # drop the old engine (and its buffers) before building the new one
        engine = MTLBackward.from_config(params, method, config)
        _CACHE.append(engine)
    elif isinstance(method, str):
        if engine._method_name != method:  # a name keeps its method (and its state) across calls
            engine.method = _method(method)
    elif engine.method is not _method(method):
        engine.method = _method(method)  # buffers depend on the parameters only: keep them
    engine._method_name = method if isinstance(method, str) else None
    return engine.backward(losses, features, retain_graph=retain_graph, grad_scaler=grad_scaler)
