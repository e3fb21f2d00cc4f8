"""The training API: ``mtlfast.backward(losses, shared, method)`` in place of ``loss.backward()``.

One call computes the per-task gradients of the shared parameters (batched), the method's
weights from their Gram ``K = G G^T`` on the device, and writes the combined update ``w @ G``
into the shared parameters' ``.grad``; every other parameter (the heads) gets its ordinary
gradient of ``sum_t L_t``. Existing ``.grad`` is accumulated into, like ``loss.backward()``.
Then ``optimizer.step()`` as usual.

Modes: ``"jacobian"`` (G in one flat (T, P) buffer), ``"gramian"`` (K streamed per parameter, G
never whole, then one weighted backward), ``"features"`` (K of dL/dZ only, MGDA-UB), ``"auto"``.

Non-finite policy (``on_nonfinite``): ``"raise"`` (default) raises ``ValueError`` when a loss or
a gradient is NaN/Inf, before anything is written (one host read per step); ``"skip"`` never
reads the device: the whole step's contribution is zeroed with ``torch.where`` and
``StepInfo.skipped`` says so. With a ``grad_scaler`` the scaler's own policy applies instead:
``.grad`` holds the *scaled* update (NaN on overflow), so ``scaler.step(opt)`` unscales, detects
the overflow and skips, and ``scaler.update()`` backs the scale off, exactly as with
``scaler.scale(loss).backward()``; the method always sees unscaled gradients.

Distributed (``process_group=``, see ``mtlfast.distributed``): ``distributed_mode="exact"``
all-reduces the (T, P) Jacobian (in ``bucket_cap_mb`` buckets started during the backward) and
runs the method on the global Gram, equal to one process on the global batch (jacobian mode
only); ``"local"`` projects per rank and averages the update.

CUDA graphs. On CUDA, a jacobian-mode step of a Gram method makes no host synchronization when
the engine uses ``on_nonfinite="skip"`` (the gradients, Gram, T x T solve and combination all
stay on the device; the method follows the engine's device-side flag, whatever its own policy;
"raise" reads one flag per step). Such a step (forward + ``backward``) can be captured once and
replayed, the usual whole-network capture recipe::

    engine = MTLBackward(trunk, UPGrad(), mode="jacobian", on_nonfinite="skip")
    def step():                                   # reads only static_x / static_y
        losses, z = model(static_x, static_y)
        engine.backward(losses, features=z)
    side = torch.cuda.Stream(); side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                 # warm-up: buffers, batching decision
        for _ in range(3):
            model.zero_grad(set_to_none=True); step()
    torch.cuda.current_stream().wait_stream(side)
    model.zero_grad(set_to_none=True)             # the captured step then overwrites .grad
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for x, y in loader:                           # training
        static_x.copy_(x); static_y.copy_(y)
        graph.replay()                            # .grad = this batch's update
        opt.step()                                # no zero_grad(set_to_none=True) in between

Replays equal eager steps for the methods without host-side state (UPGrad, DualProj, MGDA,
CAGrad, IMTLG, FairGrad, AlignedMTL, ConFIG, Mean, Sum, and PCGrad, whose random orders come
from a counter advanced on the device, so each replay draws new ones; tests/test_capturable.py).
Not graph-safe: GradVac (its random orders are drawn on the host: a replay reuses the captured
ones) and the methods with host-side state (NashMTL's update counter, GradNorm's and GradVac's
state buffers, which Python reassigns each step). T <= 64 keeps every T x T solve in one kernel.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from . import methods, ops
from .distributed import DataParallel, DistributedMode, reject_sharded
from .distributed.data_parallel import DEFAULT_BUCKET_CAP_MB
from .engine import (
    Batching,
    SharedParams,
    Strategy,
    add_to_grads,
    as_features,
    as_losses,
    as_shared,
    feature_gram,
    gramian,
    jacobian,
    layerwise_update,
    per_task_grads,
    scan_graph,
    weighted_update,
)
from .methods import Method

__all__ = ["MTLBackward", "Mode", "StepInfo", "backward"]

Mode = Literal["auto", "jacobian", "gramian", "features"]
_MODES = ("auto", "jacobian", "gramian", "features")

#: Default budget for mode="auto": a (T, P) Jacobian up to this many bytes runs in jacobian mode.
DEFAULT_JACOBIAN_BUDGET = 2 << 30


@dataclass
class StepInfo:
    """What one step computed. All tensors stay on the device (reading them syncs)."""

    #: (T,) combination weights (layer-wise methods: (L, T)); zeros for a skipped step; None
    #: for whole-Jacobian methods (their update is not a weighted sum of the rows).
    weights: torch.Tensor | None
    #: (T, T) Gram of the per-task gradients (layer-wise: (L, T, T); features mode: of dL/dZ);
    #: None for methods that never form it (loss-based, whole-Jacobian).
    gram: torch.Tensor | None
    #: (T,) the losses, detached.
    losses: torch.Tensor
    #: 0-d bool: True when the step was non-finite and zeroed (or left to the grad scaler).
    skipped: torch.Tensor
    #: The mode that ran: "jacobian", "gramian", "features" or "losses".
    mode: str


def _default_method() -> Method:
    upgrad = getattr(methods, "UPGrad", None)
    if upgrad is None:
        raise ValueError(
            "method is required: the default UPGrad is not available in this build "
            "(pass e.g. method=mtlfast.methods.Mean())"
        )
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = upgrad()
    return _DEFAULT


_DEFAULT: Method | None = None


def _check_scaler(grad_scaler: object) -> torch.amp.GradScaler | None:
    if grad_scaler is None:
        return None
    if not isinstance(grad_scaler, torch.amp.GradScaler):
        raise TypeError(
            f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}"
        )
    return grad_scaler if grad_scaler.is_enabled() else None


def _finite(*tensors: torch.Tensor | None,
            grads: Sequence[torch.Tensor | None] = ()) -> torch.Tensor:
    oks = [torch.isfinite(t).all() for t in tensors if t is not None]
    present = [g for g in grads if g is not None]
    if present:
        oks.append(torch.isfinite(torch.stack(torch._foreach_norm(present))).all())
    return torch.stack(oks).all()


class MTLBackward(nn.Module):
    """``mtlfast.backward`` as an object: keeps the flat buffers, the method and its state.

    Args:
        shared: the shared parameters (an iterable, or the trunk ``nn.Module``).
        method: a ``mtlfast.methods`` method (default ``UPGrad()``).
        mode: ``"auto"`` | ``"jacobian"`` | ``"gramian"`` | ``"features"`` (see module doc).
        chunk_size: at most this many tasks per batched backward (caps memory; None: all T).
        jacobian_dtype: dtype of the (T, P) buffer (default float32, float64 for float64
            parameters; bfloat16 halves its memory).
        jacobian_budget: bytes a (T, P) Jacobian may take before mode="auto" picks gramian.
        on_nonfinite: ``"raise"`` or ``"skip"`` (see module doc).
        process_group: a ``torch.distributed`` group the model is data-parallel over (DDP; run
            its forward under ``mtlfast.distributed.no_sync``); None: one process.
        distributed_mode: ``"exact"`` (all-reduce G, the global batch's step) or ``"local"``
            (per-rank projection, averaged update; ordinary DDP volume).
        bucket_cap_mb: exact mode: MiB of the (T, P) Jacobian per all-reduce bucket, each
            started during the backward once written (default 25, like DDP; None: one
            all-reduce in place after the backward, no (T, P) staging buffer).
        vjp: how the T per-task backward passes (through the heads to ``features``, and
            through the shared parameters) run:
            ``"batched"`` (one vmapped backward), ``"loop"`` (T ordinary backward passes) or
            ``"auto"`` (batched on accelerators; on a CPU both are timed over the first eight
            steps and the faster kept, see ``mtlfast.engine.vjp``). The values are the same
            either way, to rounding. With ``process_group``, ``"auto"`` means ``"batched"``.
    """

    def __init__(
        self,
        shared: object,
        method: Method | None = None,
        *,
        mode: Mode = "auto",
        chunk_size: int | None = None,
        jacobian_dtype: torch.dtype | None = None,
        jacobian_budget: int = DEFAULT_JACOBIAN_BUDGET,
        on_nonfinite: Literal["raise", "skip"] = "raise",
        process_group: object = None,
        distributed_mode: DistributedMode = "exact",
        bucket_cap_mb: float | None = DEFAULT_BUCKET_CAP_MB,
        vjp: Strategy = "auto",
    ) -> None:
        super().__init__()
        method = _default_method() if method is None else method
        if not isinstance(method, Method):
            raise TypeError(f"method must be a mtlfast.methods.Method, got {type(method).__name__}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        if jacobian_dtype is not None and not (
            isinstance(jacobian_dtype, torch.dtype) and jacobian_dtype.is_floating_point
        ):
            raise TypeError(
                f"jacobian_dtype must be a floating torch.dtype, got {jacobian_dtype!r}"
            )
        if not isinstance(jacobian_budget, int) or jacobian_budget < 0:
            raise ValueError(f"jacobian_budget must be a non-negative int, got {jacobian_budget!r}")
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        self.method = method
        self.mode = mode
        self.chunk_size = chunk_size
        self.on_nonfinite = on_nonfinite
        self.jacobian_budget = jacobian_budget
        self._shared = SharedParams(as_shared(shared))
        reject_sharded(self._shared.params)
        if jacobian_dtype is None:
            jacobian_dtype = (torch.float64 if self._shared.grad_dtype == torch.float64
                              else torch.float32)
        self.jacobian_dtype = jacobian_dtype
        self._dist = (None if process_group is None
                      else DataParallel(process_group, distributed_mode,
                                        bucket_cap_mb=bucket_cap_mb))
        if vjp not in typing.get_args(Strategy):
            raise ValueError(f"vjp must be one of {typing.get_args(Strategy)}, got {vjp!r}")
        if vjp == "auto" and process_group is not None:
            vjp = "batched"  # ranks timing apart could pick different collective orders
        self._heads = Batching("task heads (losses -> features)", vjp)
        self._trunk = Batching("shared parameters", vjp)
        self.vjp = vjp

    @property
    def shared(self) -> list[torch.Tensor]:
        return self._shared.params

    def _layerwise(self) -> bool:
        return getattr(self.method, "granularity", "matrix") == "parameter"

    def resolve_mode(self, num_tasks: int, has_features: bool) -> str:
        """The mode a step with T tasks runs in; ValueError for a combination that cannot run."""
        name, needs, mode = type(self.method).__name__, self.method.needs, self.mode
        if needs == "losses":
            if mode != "auto":
                raise ValueError(f"mode={mode!r}: {name} is loss-based (one weighted backward, "
                                 "no per-task gradients); use mode='auto'")
            return "losses"
        if needs == "jacobian":
            if mode not in ("auto", "jacobian"):
                raise ValueError(f"mode={mode!r}: {name} needs the whole (T, P) Jacobian; "
                                 "only mode='jacobian' (or 'auto') can run it")
            return "jacobian"
        if needs != "gram":
            raise ValueError(f"{name}.needs must be 'gram', 'jacobian' or 'losses', got {needs!r}")
        if mode == "features":
            if not has_features:
                raise ValueError("mode='features' needs features= (the shared representation Z)")
            if self._layerwise():
                raise ValueError(f"mode='features': {name} is layer-wise (granularity="
                                 "'parameter'); the feature Gram has no layers")
            return "features"
        if self._dist is not None and self._dist.exact:
            if mode not in ("auto", "jacobian"):  # K of the global batch needs G itself
                raise ValueError(f"mode={mode!r} cannot run with process_group in distributed_mode"
                                 "='exact' (it all-reduces the (T, P) Jacobian): use mode="
                                 "'jacobian' or distributed_mode='local'")
            return "jacobian"
        if mode == "auto":
            need = num_tasks * self._shared.size * self.jacobian_dtype.itemsize
            return "jacobian" if need <= self.jacobian_budget else "gramian"
        return mode

    def backward(
        self,
        losses: object,
        features: object = None,
        *,
        retain_graph: bool = False,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> StepInfo:
        """Write the step's gradients into ``.grad`` (accumulating) and report what it computed."""
        lv = as_losses(losses)
        feats = as_features(features)
        scaler = _check_scaler(grad_scaler)
        num_tasks = len(lv.names)
        mode = self.resolve_mode(num_tasks, feats is not None)
        self.method.bind_tasks(num_tasks)
        if lv.values.device != self._shared.device:
            raise ValueError(f"losses are on {lv.values.device}, shared parameters on "
                             f"{self._shared.device}")
        scan = scan_graph(lv, self._shared.params, feats)
        if self._dist is not None:
            self._dist.check_config(num_tasks=num_tasks, size=self._shared.size,
                                    heads=sum(p.numel() for p in scan.others),
                                    method=self.method, device=self._shared.device,
                                    mode=f"{mode}, on_nonfinite={self.on_nonfinite}")
            self._dist.sync_method(self.method)
        step = _Step(self, lv.values, scan.others, feats, scaler, retain_graph)
        if mode == "losses":
            return step.run_losses()
        return step.run(mode)


class _Step:
    """One call's worth of state: scaled losses, cotangents, the finite flag, the writes."""

    def __init__(self, engine: MTLBackward, L: torch.Tensor, others: list[torch.Tensor],
                 feats: tuple[torch.Tensor, ...] | None, scaler: torch.amp.GradScaler | None,
                 retain_graph: bool) -> None:
        self.engine, self.others, self.feats = engine, others, feats
        self.retain_graph = retain_graph
        self.shared, self.dist = engine._shared, engine._dist
        self.losses = L.detach()
        self.skip = engine.on_nonfinite == "skip" or scaler is not None
        self.scaler = scaler
        if scaler is not None:
            self.L = scaler.scale(L)  # initializes the scale on first use
            self.scale = scaler._scale.reshape(()).to(torch.float32)
        else:
            self.L, self.scale = L, None

    # -- the non-finite policy -------------------------------------------------------------------

    def check(self, ok: torch.Tensor, what: Callable[[], str]) -> None:
        if not self.skip and self.dist is not None:
            ok = self.dist.agree(ok)  # raise on every rank or none (no rank left in a collective)
        if not self.skip and not bool(ok):
            raise ValueError(
                f"mtlfast.backward: {what()} contain NaN or Inf; nothing was written to .grad "
                "(pass on_nonfinite='skip' to zero such steps without a host sync)"
            )

    def describe(self, grads: list[torch.Tensor | None], K: torch.Tensor | None) -> str:
        if not bool(torch.isfinite(self.losses).all()):
            bad = (~torch.isfinite(self.losses)).nonzero().flatten().tolist()
            return f"the losses (tasks {bad})"
        if K is not None and not bool(torch.isfinite(K).all()):
            return "the per-task gradients of the shared parameters"
        return "the gradients of the non-shared parameters"

    def marker(self, ok: torch.Tensor) -> torch.Tensor:
        """Multiplier of the update: 1 when finite; 0 (skip) or NaN (scaler: skip the step)."""
        bad = float("nan") if self.scaler is not None else 0.0
        return torch.where(ok, 1.0, bad)

    def mask(self, grads: list[torch.Tensor | None], ok: torch.Tensor) -> list[torch.Tensor | None]:
        if not self.skip or self.scaler is not None:
            return grads  # under a scaler, non-finite values must reach .grad
        return [None if g is None else torch.where(ok, g, 0.0) for g in grads]

    # -- loss-based methods ----------------------------------------------------------------------

    def run_losses(self) -> StepInfo:
        method = self.engine.method
        if self.dist is not None:  # the global batch's losses drive the weights on every rank
            self.losses = self.dist.average_with_losses(self.losses, [], [])[0]
        ok = torch.isfinite(self.losses).all()
        self.check(ok, lambda: "the losses")
        safe = torch.where(ok, self.losses, 1.0) if self.skip else self.losses
        leaf = safe.clone().requires_grad_(True)
        total = method(leaf)
        own = [p for p in method.parameters() if p.requires_grad]
        w = torch.autograd.grad(total, leaf, retain_graph=bool(own))[0]
        w_eff = w * self.marker(ok) if self.skip else w
        leaves = self.shared.params + self.others
        grads = list(torch.autograd.grad(self.L, leaves, grad_outputs=w_eff.to(self.L.dtype),
                                         retain_graph=self.retain_graph, allow_unused=True))
        if self.dist is not None:  # one all-reduce, the volume of ordinary DDP
            grads = self.dist.average(leaves, grads)
        own_grads = list(torch.autograd.grad(total, own, allow_unused=True)) if own else []
        if self.scale is not None:
            own_grads = [None if g is None else g * self.scale for g in own_grads]
        ok = ok & _finite(grads=grads + own_grads)
        self.check(ok, lambda: "the gradients")
        grads, own_grads = self.mask(grads, ok), self.mask(own_grads, ok)
        n = len(self.shared.params)
        self.shared.add_list(grads[:n])
        add_to_grads(self.others, grads[n:])
        add_to_grads(own, own_grads)
        return StepInfo(torch.where(ok, w, 0.0) if self.skip else w, None, self.losses, ~ok,
                        "losses")

    # -- per-task gradient methods ---------------------------------------------------------------

    def run(self, mode: str) -> StepInfo:
        e = self.engine
        T = self.L.shape[0]
        eye = torch.eye(T, dtype=self.L.dtype, device=self.L.device)
        head_grads: list[torch.Tensor | None] = []
        if self.others:
            head_grads = list(torch.autograd.grad(self.L, self.others,
                                                  grad_outputs=torch.ones_like(self.L),
                                                  retain_graph=True, allow_unused=True))
        if self.feats is not None:
            outputs: list[torch.Tensor] = list(self.feats)
            cots = per_task_grads([self.L], [eye], outputs, batching=e._heads)
        else:
            outputs, cots = [self.L], [eye]
        if mode != "jacobian":
            self.shared.release()
        if mode == "jacobian":
            exact = self.dist is not None and self.dist.exact
            sink = None
            if exact:  # G, L, heads of the global batch; G's buckets go during the backward
                averaged = self.dist.start_average(self.losses, self.others, head_grads)
                sink = self.dist.jacobian_sink(
                    self.shared, self.shared.jacobian(T, e.jacobian_dtype),
                    overlap=not e._trunk.may_replay(self.shared.device))
            G = jacobian(self.shared, outputs, cots, batching=e._trunk, dtype=e.jacobian_dtype,
                         chunk_size=e.chunk_size, retain_graph=self.retain_graph, sink=sink)
            if exact:
                self.losses, head_grads = averaged()
                sink.wait()
            if e.method.needs == "jacobian":
                return self._whole_jacobian(G, head_grads)
            K = self._grams(G) if e._layerwise() else ops.gram(G)
        elif mode == "gramian":
            K = gramian(self.shared, outputs, cots, batching=e._trunk, chunk_size=e.chunk_size,
                        layerwise=e._layerwise())
        else:  # features
            K = feature_gram(cots)
        if self.scale is not None:
            K = K / (self.scale * self.scale)
        ok = _finite(self.losses, K, grads=head_grads)
        self.check(ok, lambda: self.describe(head_grads, K))
        w = self._weights(K, ok)
        w_eff = w * self.marker(ok) if self.skip else w
        local = self.dist is not None and not self.dist.exact
        if mode == "jacobian" and not local:
            self._write_combined(G, w_eff, ok)
        else:
            if mode == "jacobian":  # local: the update goes through the all-reduce below
                update = torch.empty(self.shared.size, dtype=self.shared.work_dtype,
                                     device=G.device)
                self._combine(G, w_eff, update, False)
                grads = [update[self.shared.slice(i)].view(p.shape)
                         for i, p in enumerate(self.shared.params)]
            elif mode == "gramian" and e._layerwise():
                grads = layerwise_update(self.shared, outputs, cots, w_eff, batching=e._trunk,
                                         chunk_size=e.chunk_size, retain_graph=self.retain_graph)
            else:
                grads = weighted_update(self.shared, outputs, cots, w_eff,
                                        retain_graph=self.retain_graph)
            # The weighted pass may overflow where K did not (features mode sees dL/dZ only).
            ok = ok & _finite(grads=grads)
            self.check(ok, lambda: "the gradients of the shared parameters")
            grads = self.mask(grads, ok)
            if local:  # ordinary DDP volume: the rank's combined update and heads, averaged
                n = len(grads)
                both = self.dist.average(self.shared.params + self.others,
                                         grads + self.mask(head_grads, ok))
                grads, head_grads = list(both[:n]), list(both[n:])
            self.shared.add_list(grads)
        add_to_grads(self.others, self.mask(head_grads, ok))
        reported = torch.where(ok, w, 0.0) if self.skip and self.scaler is None else w
        return StepInfo(reported, K, self.losses, ~ok, mode)

    def _grams(self, G: torch.Tensor) -> torch.Tensor:
        return torch.stack([ops.gram(G[:, self.shared.slice(i)])
                            for i in range(len(self.shared.params))])

    def _weights(self, K: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        if not self.skip:
            return self.engine.method.weights(K, self.losses)
        # The method takes the skip path on the engine's flag, whatever its own policy: no host
        # read, and a skipped step leaves a stateful method's state as it was.
        return self.engine.method.weights(K, self.losses, finite=ok)

    def _write_combined(self, G: torch.Tensor, w: torch.Tensor, ok: torch.Tensor) -> None:
        shared = self.shared
        zero_nonfinite = self.skip and self.scaler is None  # G may hold NaN: 0 * NaN = NaN

        def write(out: torch.Tensor, accumulate: bool) -> None:
            if zero_nonfinite:
                update = torch.empty(shared.size, dtype=out.dtype, device=out.device)
                self._combine(G, w, update, False)
                update = torch.where(ok, update, 0.0)
                out.add_(update) if accumulate else out.copy_(update)
            else:
                self._combine(G, w, out, accumulate)

        shared.add_flat(write)

    def _combine(self, G: torch.Tensor, w: torch.Tensor, out: torch.Tensor,
                 accumulate: bool) -> None:
        """``out (+)= w @ G`` (layer-wise methods: per parameter with its own weights)."""
        if not self.engine._layerwise():
            ops.combine(w.to(G.dtype), G, out, accumulate=accumulate)
            return
        for i in range(len(self.shared.params)):
            sl = self.shared.slice(i)
            ops.combine(w[i].to(G.dtype), G[:, sl], out[sl], accumulate=accumulate)

    def _whole_jacobian(self, G: torch.Tensor, head_grads: list[torch.Tensor | None]) -> StepInfo:
        if self.scale is not None:
            G.mul_(1.0 / self.scale)
        ok = _finite(self.losses, grads=head_grads)
        self.check(ok, lambda: self.describe(head_grads, None))
        update = self.engine.method.aggregate(G, self.losses)
        ok = ok & torch.isfinite(update).all()
        self.check(ok, lambda: "the per-task gradients or the aggregated update")
        if self.skip:
            update = torch.where(ok, update, 0.0) if self.scaler is None else update
        if self.scale is not None:
            update = update * self.scale * self.marker(ok)
        if self.dist is not None and not self.dist.exact:  # average the rank's update
            both = self.dist.average([update] + self.others,
                                     [update] + self.mask(head_grads, ok))
            update, head_grads = both[0], list(both[1:])

        def write(out: torch.Tensor, accumulate: bool) -> None:
            out.add_(update.to(out.dtype)) if accumulate else out.copy_(update)

        self.shared.add_flat(write)
        add_to_grads(self.others, self.mask(head_grads, ok))
        return StepInfo(None, None, self.losses, ~ok, "jacobian")


_CACHE: list[MTLBackward] = []


def backward(
    losses: object,
    shared: object,
    method: Method | None = None,
    features: object = None,
    mode: Mode = "auto",
    retain_graph: bool = False,
    grad_scaler: torch.amp.GradScaler | None = None,
    *,
    chunk_size: int | None = None,
    jacobian_dtype: torch.dtype | None = None,
    jacobian_budget: int = DEFAULT_JACOBIAN_BUDGET,
    on_nonfinite: Literal["raise", "skip"] = "raise",
    process_group: object = None,
    distributed_mode: DistributedMode = "exact",
    bucket_cap_mb: float | None = DEFAULT_BUCKET_CAP_MB,
    vjp: Strategy = "auto",
) -> StepInfo:
    """Multi-task ``loss.backward()``: ``.grad`` of ``shared`` += ``w @ G``, heads += their grads.

    ``G`` (T x P) holds the per-task gradients of the shared parameters, ``w`` the method's
    weights (UPGrad by default, Quinton & Rey 2024) from ``K = G G^T``. See ``MTLBackward`` for
    the options; the last engine built here is reused while ``shared`` and the options stay
    the same (a new ``method`` object just replaces the old one), so its (T, P) buffer is
    allocated once. With ``process_group`` (DDP; forward under ``mtlfast.distributed.no_sync``)
    the step is the global batch's (``distributed_mode="exact"``) or per-rank (``"local"``).
    """
    params = as_shared(shared)
    method = _default_method() if method is None else method
    config = (mode, chunk_size, jacobian_dtype, jacobian_budget, on_nonfinite, process_group,
              distributed_mode, bucket_cap_mb, vjp)
    engine = _CACHE[0] if _CACHE else None
    if engine is None or engine._config != config or not engine._shared.same_as(params):
        _CACHE.clear()  # drop the old engine (and its buffers) before building the new one
        engine = MTLBackward(params, method, mode=mode, chunk_size=chunk_size,
                             jacobian_dtype=jacobian_dtype, jacobian_budget=jacobian_budget,
                             on_nonfinite=on_nonfinite, process_group=process_group,
                             distributed_mode=distributed_mode, bucket_cap_mb=bucket_cap_mb,
                             vjp=vjp)
        engine._config = config
        _CACHE.append(engine)
    elif engine.method is not method:
        engine.method = method  # buffers depend on the parameters only: keep them
    return engine.backward(losses, features, retain_graph=retain_graph, grad_scaler=grad_scaler)
