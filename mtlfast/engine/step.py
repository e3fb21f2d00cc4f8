"""The step as a pipeline: produce -> check -> weigh -> reduce -> write, then commit.

::

    losses, features
      │  validate (inputs.py), resolve the mode, walk the graph once (non-shared leaves)
      ▼
    produce   jacobian: G (T, P) in one flat buffer      gramian: K streamed per parameter
              features: K of dL/dZ                        losses: the losses alone
      │       (the reducer's sink reduces G's blocks across ranks as they are written)
      ▼
    check     one Policy (raise | skip | GradScaler), flags agreed over the ranks
      ▼
    weigh     the method proposes weights / an update from K or G; nothing is committed yet
      ▼
    reduce    (DDP local) per-rank updates averaged
      ▼
    write     w @ G into the flat .grad buffer (ops.combine), heads' ordinary gradients
      ▼
    commit    the method's new state; the engine's own (batching) state
    (a call that raises or is skipped changes neither .grad nor any state)

:class:`Engine` holds what lives across steps (the layout and its buffers, the method, the
reducer, the batching decisions); :class:`_Step` is one call.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence

import torch

from .. import ops
from .accumulate import Accumulator
from .config import EngineConfig, StepInfo
from .features import feature_gram
from .flat import SharedParams, add_to_grads
from .gramian import gramian, layerwise_update
from .inputs import LossVector, as_features, as_losses, check_call, scan_graph
from .jacobian import JacobianSink, jacobian
from .policy import Policy, check_scaler, finite
from .reduce import Reducer
from .vjp import Batching, per_task_grads

__all__ = ["Engine"]


class Engine:
    """The per-task gradient engine: one pipeline for every mode, method kind and reducer."""

    def __init__(self, method: object, config: EngineConfig, reducer: Reducer) -> None:
        self.method = method
        self.config = config
        self.reducer = reducer
        vjp = config.vjp if reducer.vjp_auto or config.vjp != "auto" else "batched"
        self.heads = Batching("task heads (losses -> features)", vjp)
        self.trunk = Batching("shared parameters", vjp)
        self.vjp = vjp
        self._consumed: list[weakref.ref] = []  # losses of the last call that freed its graph
        self._checked_tasks = False  # the per-task reach of the shared parameters was checked
        self._versions: tuple[int, list[int]] | None = None  # see _check_method_optimized
        self._warned_unoptimized = False
        self.accumulator = Accumulator(config.accumulate) if config.accumulate > 1 else None

    def layerwise(self) -> bool:
        return getattr(self.method, "granularity", "matrix") == "parameter"

    def jacobian_dtype(self, layout: SharedParams) -> torch.dtype:
        if self.config.jacobian_dtype is not None:
            return self.config.jacobian_dtype
        return torch.float64 if layout.grad_dtype == torch.float64 else torch.float32

    def resolve_mode(self, num_tasks: int, has_features: bool) -> str:
        """The mode a step with T tasks runs in; ValueError for a combination that cannot run."""
        method, mode = self.method, self.config.mode
        name, needs = type(method).__name__, method.needs
        if needs == "losses":
            if mode != "auto":
                raise ValueError(f"mode={mode!r}: {name} is loss-based (one weighted backward, "
                                 "no per-task gradients); use mode='auto'")
            resolved = "losses"
        elif needs == "jacobian":
            if mode not in ("auto", "jacobian"):
                raise ValueError(f"mode={mode!r}: {name} needs the whole (T, P) Jacobian; "
                                 "only mode='jacobian' (or 'auto') can run it")
            resolved = "jacobian"
        elif needs != "gram":
            raise ValueError(f"{name}.needs must be 'gram', 'jacobian' or 'losses', got {needs!r}")
        elif mode == "features":
            if not has_features:
                raise ValueError("mode='features' needs features= (the shared representation Z)")
            if self.layerwise():
                raise ValueError(f"mode='features': {name} is layer-wise (granularity="
                                 "'parameter'); the feature Gram has no layers")
            if getattr(method, "batches", 1) != 1:
                # Each batch's losses depend on its own rows of Z only: the cross-batch blocks
                # of the feature Gram, which such a method reads, are zero.
                raise ValueError(f"mode='features': {name}(batches={method.batches}) reads "
                                 "products of gradients from different mini-batches, and "
                                 "those of dL/dZ are zero (each batch's losses depend on its "
                                 "own features only); use mode='jacobian', 'gramian' or 'auto'")
            resolved = "features"
        elif mode == "auto" and (self.reducer.needs_jacobian or self.accumulator is not None):
            resolved = "jacobian"
        elif mode == "auto":
            layout = self.reducer.layout()
            need = num_tasks * layout.size * self.jacobian_dtype(layout).itemsize
            resolved = "jacobian" if need <= self.config.jacobian_budget else "gramian"
        else:
            resolved = mode
        if self.accumulator is not None and resolved != "jacobian":
            raise ValueError(
                f"accumulate={self.config.accumulate} sums each micro-batch's per-task gradients "
                f"and needs mode='jacobian' with a Gram or whole-Jacobian method; {name} runs in "
                f"mode {resolved!r} (gramian and features modes never hold G, and a loss-based "
                "method's total cannot be back-propagated again): use mode='jacobian' or "
                "accumulate=1 (per-micro-batch weights)")
        self.reducer.check_mode(resolved, method)
        return resolved

    def backward(self, losses: object, features: object = None, *, retain_graph: bool = False,
                 grad_scaler: torch.amp.GradScaler | None = None,
                 step: bool | None = None) -> StepInfo:
        """One step: ``.grad`` += the method's update (heads: ordinary gradients). With
        accumulation, a micro-batch: ``step`` True weighs what was accumulated now, False only
        accumulates, None (default) steps on every ``accumulate``-th call."""
        if step is not None and not isinstance(step, bool):
            raise TypeError(f"step must be a bool or None, got {type(step).__name__}")
        if step is not None and self.accumulator is None:
            raise ValueError("step= needs an engine built with accumulate > 1")
        lv = as_losses(losses)
        feats = as_features(features)
        scaler = check_scaler(grad_scaler)
        if not isinstance(retain_graph, bool):
            raise TypeError(f"retain_graph must be a bool, got {type(retain_graph).__name__}")
        layout = self.reducer.layout()
        check_call(lv, layout, self._consumed)
        T = len(lv.names)
        mode = self.resolve_mode(T, feats is not None)
        self.method.check_tasks(T)
        scan = scan_graph(lv, layout.params, feats, per_task=not self._checked_tasks)
        self.reducer.begin(num_tasks=T, layout=layout, heads=sum(p.numel() for p in scan.others),
                           method=self.method,
                           mode=f"{mode}, on_nonfinite={self.config.on_nonfinite}")
        saved = (self.heads.snapshot(), self.trunk.snapshot())
        final = self.accumulator is None or self.accumulator.final(step)
        run = _Step(self, lv, layout, scan.others, feats, scaler, retain_graph, final)
        try:
            info, proposal, ok = run.run(mode)
        except BaseException:
            self.heads.restore(saved[0])  # a failed call leaves the batching decisions too
            self.trunk.restore(saved[1])
            raise
        if not final:
            self.accumulator.add(*run.contribution)
        else:
            self.method.commit(proposal, ok, T)
            if self.accumulator is not None:
                self.accumulator.reset()
        self._consumed = [] if retain_graph else lv.refs()
        self._checked_tasks = True
        self._check_method_optimized(layout)
        return info

    def _check_method_optimized(self, layout: SharedParams) -> None:
        """Warn once when the method's own parameters (UW's log-variances) stay untouched
        between two steps while the shared parameters moved: they are not in the optimizer.
        Reads only the tensors' version counters (no device access)."""
        own = [p for p in self.method.parameters() if p.requires_grad]
        if not own or self._warned_unoptimized:
            return
        now = (sum(p._version for p in layout.params), [p._version for p in own])
        before, self._versions = self._versions, now
        if before is not None and now[0] != before[0] and now[1] == before[1]:
            self._warned_unoptimized = True
            warnings.warn(
                f"mtlfast: {type(self.method).__name__}'s own parameters did not change since the "
                "last step while the shared parameters did: they are not being optimized. Add "
                "method.parameters() to the optimizer, e.g. torch.optim.Adam([*model.parameters(), "
                "*method.parameters()])", RuntimeWarning, stacklevel=3)


class _Step:
    """One call's worth of state: scaled losses, cotangents, the policy, the writes."""

    def __init__(self, engine: Engine, lv: LossVector, layout: SharedParams,
                 others: list[torch.Tensor], feats: tuple[torch.Tensor, ...] | None,
                 scaler: torch.amp.GradScaler | None, retain_graph: bool,
                 final: bool = True) -> None:
        self.engine, self.layout, self.others, self.feats = engine, layout, others, feats
        self.final = final
        self.contribution: tuple | None = None  # a micro-batch's (G_i, losses, heads)
        self.method, self.reducer = engine.method, engine.reducer
        self.names = lv.names
        self.retain_graph = retain_graph
        self.losses = lv.values.detach()
        self.policy = Policy(engine.config.on_nonfinite, scaler, engine.reducer)
        self.L = self.policy.scaled(lv.values)
        # Each task's own (scaled) loss, when given apart: a loop of backward passes starts at
        # its root instead of pushing a one-hot cotangent through every task's head.
        parts = lv.given if len(lv.given) == len(lv.names) and lv.roots is not None else None
        if parts is not None and self.policy.scale is not None:
            parts = [p * self.policy.scale for p in parts]
        self.task_losses = parts
        self.trunk_tasks = parts if feats is None else None
        self.proposal = None

    def run(self, mode: str):
        try:
            if not self.final:
                info, ok = self.run_micro_batch()
            elif mode == "losses":
                info, ok = self.run_losses()
            elif self.method.needs == "jacobian":
                info, ok = self.run_whole_jacobian()
            else:
                info, ok = self.run_gram(mode)
        except BaseException:
            if self.proposal is not None:
                self.method.discard(self.proposal)
            raise
        return info, self.proposal, ok

    # -- shared pieces -----------------------------------------------------------------------

    def describe(self, per_task: torch.Tensor | None = None,
                 head_grads: Sequence[torch.Tensor | None] = (), *,
                 weights: torch.Tensor | None = None) -> str:
        """What this rank found non-finite, most upstream first (host reads: raise path only)."""
        bad = (~torch.isfinite(self.losses)).nonzero().flatten().tolist()
        if bad:
            named = [self.names[i] for i in bad]
            return f"the losses (tasks {bad}" + (
                ")" if named == [f"task {i}" for i in bad] else f": {named})")
        if per_task is not None and not bool(torch.isfinite(per_task).all()):
            return "the per-task gradients of the shared parameters"
        if head_grads and not bool(finite(grads=head_grads)):
            return "the gradients of the non-shared parameters"
        if weights is not None and not bool(torch.isfinite(weights).all()):
            return f"the weights {type(self.method).__name__} computed"
        return "the gradients of the shared parameters"

    def head_grads(self, cotangent: torch.Tensor) -> list[torch.Tensor | None]:
        if not self.others:
            return []
        return list(torch.autograd.grad(self.L, self.others, grad_outputs=cotangent,
                                        retain_graph=True, allow_unused=True))

    def cotangents(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(outputs, per-task cotangents ``(T, *output.shape)``) of the trunk's backward:
        the features with dL_t/dZ when given (computed once, for all tasks), else the losses
        with the identity."""
        T = self.L.shape[0]
        eye = torch.eye(T, dtype=self.L.dtype, device=self.L.device)
        if self.feats is None:
            return [self.L], [eye]
        outputs = list(self.feats)
        return outputs, per_task_grads([self.L], [eye], outputs, batching=self.engine.heads,
                                       task_outputs=self.task_losses)

    def produce_jacobian(self, outputs, cots, head_grads):
        """G (T, P) through the reducer's sink, with the losses and heads reduced beside it."""
        engine, layout = self.engine, self.layout
        T = cots[0].shape[0]
        if engine.accumulator is not None:  # the micro-batches' mean, reduced once
            G, losses, heads = engine.accumulator.mean_with(self.local_jacobian(outputs, cots),
                                                            self.losses, head_grads)
            self.losses, head_grads = self.reducer.start_inputs(losses, self.others, heads)()
            return self.reducer.reduce_jacobian(G), head_grads
        inputs = self.reducer.start_inputs(self.losses, self.others, head_grads)
        J = layout.jacobian(T, engine.jacobian_dtype(layout))
        sink = self.reducer.sink(layout, J, overlap=not engine.trunk.may_replay(layout.device))
        jacobian(layout, outputs, cots, batching=engine.trunk, dtype=J.dtype,
                 chunk_size=engine.config.chunk_size, retain_graph=self.retain_graph, sink=sink,
                 task_outputs=self.trunk_tasks)
        self.losses, head_grads = inputs()
        return self.reducer.finish_jacobian(sink), head_grads

    def local_jacobian(self, outputs, cots) -> torch.Tensor:
        """This rank's G of this call, in the layout's scratch buffer (no reduction)."""
        engine, layout = self.engine, self.layout
        J = layout.jacobian(cots[0].shape[0], engine.jacobian_dtype(layout))
        jacobian(layout, outputs, cots, batching=engine.trunk, dtype=J.dtype,
                 chunk_size=engine.config.chunk_size, retain_graph=self.retain_graph,
                 sink=JacobianSink(layout, J), task_outputs=self.trunk_tasks)
        return J

    def run_micro_batch(self):
        """Accumulation: this micro-batch's per-task gradients, checked; the engine adds them
        to the sums once the call succeeded."""
        head_grads = self.head_grads(torch.ones_like(self.L))
        outputs, cots = self.cotangents()
        J = self.local_jacobian(outputs, cots)
        # Under "raise" each micro-batch is checked (its values are this rank's only); under
        # "skip" a NaN reaches the sums and the accumulated step is skipped as a whole.
        ok = self.policy.check(finite(self.losses, J, grads=head_grads),
                               lambda: self.describe(J, head_grads), per_rank=True)
        self.contribution = (J, self.losses, head_grads)
        return StepInfo(None, None, self.losses, ~ok, "accumulating", self.names), ok

    def write_heads(self, head_grads, ok) -> None:
        self.reducer.write_heads(self.others, self.policy.mask(head_grads, ok))

    # -- loss-based methods ------------------------------------------------------------------

    def run_losses(self):
        method, policy = self.method, self.policy
        self.losses = self.reducer.mean_losses(self.losses)
        ok = policy.check(torch.isfinite(self.losses).all(), lambda: self.describe())
        if policy.skip:
            ok = ok & method._valid(self.losses)  # e.g. GLS: positive losses
        else:
            method._check_valid(self.losses)
        safe = torch.where(ok, self.losses, 1.0) if policy.skip else self.losses
        leaf = safe.clone().requires_grad_(True)
        self.proposal = method.propose_losses(leaf)
        total = self.proposal.value[0]
        own = [p for p in method.parameters() if p.requires_grad]
        w = torch.autograd.grad(total, leaf, retain_graph=bool(own))[0]
        cot = policy.weigh(w, ok).to(self.L.dtype)
        grads, head_grads = self.reducer.shared_grads(self.layout, [self.L], [cot], self.others,
                                                      retain_graph=self.retain_graph)
        own_grads = list(torch.autograd.grad(total, own, allow_unused=True)) if own else []
        if policy.scale is not None:
            own_grads = [None if g is None else g * policy.scale for g in own_grads]
        ok = ok & finite(grads=grads + head_grads + own_grads)
        ok = policy.check(ok, lambda: "the gradients")
        grads, head_grads = self.reducer.average(self.layout, policy.mask(grads, ok), self.others,
                                                 policy.mask(head_grads, ok))
        self.layout.add_list(grads)
        self.reducer.write_heads(self.others, head_grads)
        add_to_grads(own, policy.mask(own_grads, ok))
        return StepInfo(policy.reported(w, ok), None, self.losses, ~ok, "losses",
                        self.names), ok

    # -- Gram methods --------------------------------------------------------------------------

    def run_gram(self, mode: str):
        engine, policy, layout = self.engine, self.policy, self.layout
        head_grads = self.head_grads(torch.ones_like(self.L))
        outputs, cots = self.cotangents()
        G = None
        if mode == "jacobian":
            G, head_grads = self.produce_jacobian(outputs, cots, head_grads)
            K = self.grams(G) if engine.layerwise() else ops.gram(G)
            K = self.reducer.gram(K)
        else:
            layout.release()
            if mode == "gramian":
                K = gramian(layout, outputs, cots, batching=engine.trunk,
                            chunk_size=engine.config.chunk_size, layerwise=engine.layerwise(),
                            task_outputs=self.trunk_tasks)
            else:
                K = feature_gram(cots)
        K = policy.unscale_gram(K)
        # The method runs on finite stand-ins where the step is bad (identity Gram, unit
        # losses), so one flag covers the inputs and the weights: one host read under "raise".
        ok = finite(self.losses, K, grads=head_grads)
        safe_K = torch.where(ok, K, torch.eye(K.shape[-1], dtype=K.dtype, device=K.device))
        self.proposal = self.method.propose_weights(safe_K, torch.where(ok, self.losses, 1.0))
        w = self.proposal.value
        ok = policy.check(ok & torch.isfinite(w).all(),
                          lambda: self.describe(K, head_grads, weights=w))
        w_eff = policy.weigh(w, ok)
        if mode == "jacobian" and self.reducer.exact:
            self.write_combined(G, w_eff, ok)
        else:
            if mode == "jacobian":  # DDP local: the update goes through the average below
                update = torch.empty(layout.size, dtype=layout.work_dtype, device=G.device)
                self.combine(G, w_eff, update, False)
                grads = [update[layout.slice(i)].view(p.shape)
                         for i, p in enumerate(layout.params)]
            elif mode == "gramian" and engine.layerwise():
                grads = layerwise_update(layout, outputs, cots, w_eff, batching=engine.trunk,
                                         chunk_size=engine.config.chunk_size,
                                         retain_graph=self.retain_graph,
                                         task_outputs=self.trunk_tasks)
            else:
                mixed = [torch.tensordot(w_eff.to(c.dtype), c, dims=1) for c in cots]
                grads = self.reducer.shared_grads(layout, outputs, mixed, [],
                                                  retain_graph=self.retain_graph)[0]
            # The weighted pass may overflow where K did not (features mode sees dL/dZ only).
            ok = ok & policy.check(finite(grads=grads), lambda: "the gradients of the shared "
                                   "parameters")
            grads, head_grads = self.reducer.average(layout, policy.mask(grads, ok), self.others,
                                                     policy.mask(head_grads, ok))
            layout.add_list(grads)
        self.write_heads(head_grads, ok)
        return StepInfo(policy.reported(w, ok), K, self.losses, ~ok, mode, self.names), ok

    def grams(self, G: torch.Tensor) -> torch.Tensor:
        return torch.stack([ops.gram(G[:, self.layout.slice(i)])
                            for i in range(len(self.layout.params))])

    def write_combined(self, G: torch.Tensor, w: torch.Tensor, ok: torch.Tensor) -> None:
        """``.grad += w @ G`` straight into the flat gradient buffer."""
        zero_nonfinite = self.policy.skip and self.policy.scaler is None  # 0 * NaN = NaN

        def write(out: torch.Tensor, accumulate: bool) -> None:
            if zero_nonfinite:
                update = torch.empty(self.layout.size, dtype=out.dtype, device=out.device)
                self.combine(G, w, update, False)
                update = torch.where(ok, update, 0.0)
                out.add_(update) if accumulate else out.copy_(update)
            else:
                self.combine(G, w, out, accumulate)

        self.layout.add_flat(write)

    def combine(self, G: torch.Tensor, w: torch.Tensor, out: torch.Tensor,
                accumulate: bool) -> None:
        """``out (+)= w @ G`` (layer-wise methods: per parameter with its own weights)."""
        if not self.engine.layerwise():
            ops.combine(w.to(G.dtype), G, out, accumulate=accumulate)
            return
        for i in range(len(self.layout.params)):
            sl = self.layout.slice(i)
            ops.combine(w[i].to(G.dtype), G[:, sl], out[sl], accumulate=accumulate)

    # -- whole-Jacobian methods ------------------------------------------------------------------

    def run_whole_jacobian(self):
        policy, layout = self.policy, self.layout
        head_grads = self.head_grads(torch.ones_like(self.L))
        outputs, cots = self.cotangents()
        G, head_grads = self.produce_jacobian(outputs, cots, head_grads)
        if policy.scale is not None:
            G.mul_(1.0 / policy.scale)
        ok = policy.check(finite(self.losses, G, grads=head_grads),
                          lambda: self.describe(G, head_grads))
        if policy.skip:  # the method runs on finite stand-ins (a zero G) where the step is bad
            G = torch.where(ok, G, 0.0)
        self.proposal = self.method.propose_update(G, torch.where(ok, self.losses, 1.0))
        update = self.proposal.value.detach()
        ok = ok & policy.check(torch.isfinite(update).all(),
                               lambda: f"the update {type(self.method).__name__} computed")
        if policy.skip and policy.scaler is None:
            update = torch.where(ok, update, 0.0)
        if policy.scale is not None:
            update = update * policy.scale * policy.marker(ok)
        if not self.reducer.exact:  # DDP local: average the rank's update and heads
            grads = [update[layout.slice(i)].view(p.shape) for i, p in enumerate(layout.params)]
            grads, head_grads = self.reducer.average(layout, grads, self.others,
                                                     policy.mask(head_grads, ok))
            layout.add_list(grads)
            self.reducer.write_heads(self.others, head_grads)
        else:
            def write(out: torch.Tensor, accumulate: bool) -> None:
                out.add_(update.to(out.dtype)) if accumulate else out.copy_(update)

            layout.add_flat(write)
            self.write_heads(head_grads, ok)
        return StepInfo(None, None, self.losses, ~ok, "jacobian", self.names), ok
