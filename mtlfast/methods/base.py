"""The protocol every method follows.

A method is an ``nn.Module`` (its state lands in ``state_dict()``) that declares what it
needs from the engine:

- ``needs = "gram"``: ``weights(gram, losses=None) -> w`` from the ``(..., T, T)`` Gram
  ``K = G G^T``; the update is ``w @ G``. ``method(G)`` aggregates a ``(T, P)`` matrix.
- ``needs = "jacobian"``: ``aggregate(G, losses=None) -> (P,)`` needs the whole matrix.
- ``needs = "losses"``: ``loss_weights(losses) -> (T,)``; the engine does one backward of
  ``method(losses)``, the weighted (and, for some methods, regularized) total loss.

A step is a pure function of its inputs and the method's state (``_weights`` / ``_step``);
it returns a :class:`~mtlfast.methods._state.Proposal` that is committed only once the step
succeeded (see ``_state.py``). The engine owns the non-finite policy and commits after it has
written ``.grad``. Called directly (``weights``, ``aggregate``, ``method(...)``), a method applies
its own ``on_nonfinite``: ``"raise"`` (default) raises ``ValueError`` when the input holds
NaN/Inf (one host read); ``"skip"`` never reads the device: the result is zero and the state
is kept when anything was non-finite.

Writing a method: a stateless Gram method overrides ``_weights(gram, losses)``; a stateful one
lists its buffers in ``state_names``, gives their start values in ``_initial_state`` and
overrides ``_step(gram, losses, state) -> (w, new_state)`` without assigning attributes (the
result must not alias a state buffer: state is committed in place, so that a captured CUDA
graph keeps updating the same buffers).
(A ``_weights`` that assigns its own buffers still works, but commits even on failed steps.)
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from torch import nn

from .. import ops
from ._state import Proposal, commit, discard, load_lazy_buffers

__all__ = ["GramMethod", "JacobianMethod", "LossMethod", "Method", "NonFinitePolicy"]

NonFinitePolicy = Literal["raise", "skip"]
_POLICIES = ("raise", "skip")


class Method(nn.Module):
    """Base of all methods: state, the standalone non-finite policy, the bound task count."""

    needs: ClassVar[str]
    #: True when the method's output is the same for the same input (no randomness, no state).
    deterministic: ClassVar[bool] = True
    #: Buffers a step changes: ``None`` until the first step sizes them (``_initial_state``).
    state_names: ClassVar[tuple[str, ...]] = ()
    #: Other buffers that stay ``None`` until set (sized on load like the state).
    lazy_names: ClassVar[tuple[str, ...]] = ()
    #: Host attributes saved in the state_dict's extra state (with ``num_tasks``).
    host_state: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *, on_nonfinite: NonFinitePolicy = "raise") -> None:
        super().__init__()
        if on_nonfinite not in _POLICIES:
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        self.on_nonfinite: NonFinitePolicy = on_nonfinite
        self.num_tasks: int | None = None
        for name in self.state_names:
            self.register_buffer(name, None)

    # -- state ---------------------------------------------------------------------------------

    def stateful(self) -> bool:
        """True when the method carries state across steps that depends on T."""
        return bool(self.state_names)

    def get_extra_state(self) -> Any:
        state = {"num_tasks": self.num_tasks}
        state.update({name: getattr(self, name) for name in self.host_state})
        rng = getattr(self, "rng", None)
        if rng is not None:
            state["rng"] = rng.state()
        return state

    def set_extra_state(self, state: Any) -> None:
        self.num_tasks = state["num_tasks"]
        for name in self.host_state:
            setattr(self, name, state.get(name, getattr(self, name)))
        rng = getattr(self, "rng", None)
        if rng is not None and "rng" in state:
            rng.load(state["rng"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        load_lazy_buffers(self, self.state_names + self.lazy_names, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _initial_state(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """Start values of the ``state_names`` buffers for a first input ``like``."""
        raise NotImplementedError(f"{type(self).__name__} lists state_names but gives no "
                                  "_initial_state")

    def _current_state(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """The state a step starts from: the buffers, or their start values on first use."""
        if not self.state_names:
            return {}
        if getattr(self, self.state_names[0]) is None:
            return self._initial_state(like)
        return {name: getattr(self, name) for name in self.state_names}

    def check_tasks(self, num_tasks: int) -> None:
        """ValueError when a stateful method bound to another T gets ``num_tasks`` tasks."""
        if self.num_tasks is not None and self.stateful() and self.num_tasks != num_tasks:
            raise ValueError(
                f"{type(self).__name__} keeps state for T={self.num_tasks} tasks (fixed by its "
                f"options or its first step); got T={num_tasks} now (build a new method for "
                "another task set)"
            )

    def bind_tasks(self, num_tasks: int) -> None:
        """Fix T on first use; a later call with another T is an error for stateful methods."""
        self.check_tasks(num_tasks)
        self.num_tasks = num_tasks

    def commit(self, proposal: Proposal, ok: torch.Tensor | bool | None,
               num_tasks: int) -> None:
        """Keep what a successful step computed (``ok``: see ``_state.commit``); else undo it.
        T is bound by any step that is not known to have failed (a device-side skip too)."""
        commit(self, proposal, ok)
        if ok is not False:
            self.num_tasks = num_tasks

    def discard(self, proposal: Proposal) -> None:
        """Undo a proposal whose step failed."""
        discard(proposal)

    # -- the standalone non-finite policy --------------------------------------------------------

    def _standalone(self, *tensors: torch.Tensor | None, names: tuple[str, ...]
                    ) -> torch.Tensor | None:
        """Under "raise": ValueError now if any tensor is non-finite (None returned). Under
        "skip": the device flag that the inputs are finite."""
        present = [(n, t) for n, t in zip(names, tensors, strict=True) if t is not None]
        if self.on_nonfinite == "skip":
            return finite_flag(*(t for _, t in present))
        for name, t in present:
            if t.device.type != "meta" and not bool(torch.isfinite(t).all()):
                raise ValueError(
                    f"{type(self).__name__}: {name} contains NaN or Inf "
                    "(build the method with on_nonfinite='skip' to skip such steps instead)"
                )
        return None

    def _run(self, propose, inputs: tuple[torch.Tensor | None, ...], names: tuple[str, ...],
             num_tasks: int) -> tuple[Any, torch.Tensor | None]:
        """One standalone step: policy, proposal on safe inputs, commit. (value, ok flag)."""
        self.check_tasks(num_tasks)
        ok = self._standalone(*inputs, names=names)
        proposal = propose(ok)
        try:
            self.commit(proposal, ok, num_tasks)
        except BaseException:
            self.discard(proposal)
            raise
        return proposal.value, ok

    def extra_repr(self) -> str:
        return f"on_nonfinite={self.on_nonfinite!r}"


def finite_flag(*tensors: torch.Tensor | None) -> torch.Tensor:
    """0-d bool on the tensors' device: every entry of every tensor is finite."""
    oks = [torch.isfinite(t).all() for t in tensors if t is not None]
    return torch.stack(oks).all()


def check_losses(method: Method, losses: torch.Tensor | None, num_tasks: int
                 ) -> torch.Tensor | None:
    """Validate optional losses given with T tasks: None or a floating ``(..., T)`` tensor."""
    if losses is None:
        return None
    name = type(method).__name__
    if not isinstance(losses, torch.Tensor):
        raise TypeError(f"{name}: losses must be a tensor of shape ({num_tasks},), "
                        f"got {type(losses).__name__}")
    if losses.shape[-1:] != (num_tasks,):
        raise ValueError(f"{name}: losses must have shape (..., {num_tasks}), "
                         f"got {tuple(losses.shape)}")
    if not losses.is_floating_point():
        raise TypeError(f"{name}: losses must be floating point, got {losses.dtype}")
    return losses


class GramMethod(Method):
    """A method whose weights depend on the per-task gradients only through their Gram."""

    needs: ClassVar[str] = "gram"
    #: True when the paper proves ``(w @ G) . g_i >= 0`` for every task i.
    non_conflicting: ClassVar[bool] = False
    #: False when the weights ignore the Gram (Mean, Sum): ``method(G)`` then never forms it.
    reads_gram: ClassVar[bool] = True

    def _check_gram(self, gram: torch.Tensor) -> int:
        if not isinstance(gram, torch.Tensor):
            raise TypeError(f"gram must be a tensor of shape (..., T, T), got {type(gram)}")
        if gram.dim() < 2 or gram.shape[-1] != gram.shape[-2] or gram.shape[-1] == 0:
            raise ValueError(
                f"gram must have shape (..., T, T) with T > 0, got {tuple(gram.shape)}"
            )
        if not gram.is_floating_point():
            raise TypeError(f"gram must be floating point, got {gram.dtype}")
        return gram.shape[-1]

    def weights(self, gram: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
        """Combination weights ``w`` (``(..., T)``) such that the update is ``w @ G``."""
        T = self._check_gram(gram)
        losses = check_losses(self, losses, T)

        def propose(ok: torch.Tensor | None) -> Proposal:
            return self.propose_weights(*safe_inputs(gram, losses, ok))

        w, ok = self._run(propose, (gram, losses), ("gram", "losses"), T)
        if ok is None:
            return w
        return torch.where(ok & torch.isfinite(w).all(), w, 0.0)

    def propose_weights(self, gram: torch.Tensor, losses: torch.Tensor | None) -> Proposal:
        """The step on a finite Gram (checked by the caller); state uncommitted."""
        before = self._current_state(gram)
        w, after = self._step(gram, losses, before)
        return Proposal(w, after, before)

    def _step(self, gram: torch.Tensor, losses: torch.Tensor | None,
              state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Pure step: ``(w, new state)`` from the Gram, the losses and the current state."""
        return self._weights(gram, losses), {}

    def _weights(self, gram: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, G: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
        """Aggregate a ``(T, P)`` matrix: ``weights(gram(G)) @ G``."""
        if not isinstance(G, torch.Tensor) or G.dim() != 2:
            raise ValueError(f"{type(self).__name__}: G must be a (T, P) tensor")
        if self.reads_gram:
            return ops.combine(self.weights(ops.gram(G), losses), G)
        # Weights that ignore the Gram: skip its pass over G and apply the non-finite policy
        # to the update instead (a NaN/Inf in G reaches it).
        dtype = torch.float64 if G.dtype == torch.float64 else torch.float32
        w = self.weights(torch.eye(G.shape[0], dtype=dtype, device=G.device), losses)
        update = ops.combine(w, G)
        ok = self._standalone(update, names=("G",))
        return update if ok is None else torch.where(ok, update, 0.0)


def safe_inputs(gram: torch.Tensor, losses: torch.Tensor | None, ok: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Finite stand-ins where ``ok`` is False (identity Gram, unit losses): the step then runs
    on harmless values and its result is discarded."""
    if ok is None:
        return gram, losses
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return (torch.where(ok, gram, eye),
            None if losses is None else torch.where(ok, losses, 1.0))


class JacobianMethod(Method):
    """A method that needs the whole ``(T, P)`` matrix of per-task gradients."""

    needs: ClassVar[str] = "jacobian"

    def aggregate(self, G: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
        """The ``(P,)`` update from the ``(T, P)`` per-task gradients (one step)."""
        T = check_matrix(self, G)
        if losses is not None and check_loss_vector(self, losses) != T:
            raise ValueError(f"{type(self).__name__}: losses must have shape ({T},) to match G, "
                             f"got {tuple(losses.shape)}")
        self.check_tasks(T)
        self._check_inputs(G, losses)

        def propose(ok: torch.Tensor | None) -> Proposal:
            safe_G = G if ok is None else torch.where(ok, G, 0.0)
            safe_L = losses if ok is None or losses is None else torch.where(ok, losses, 1.0)
            return self.propose_update(safe_G, safe_L)

        update, ok = self._run(propose, (G, losses), ("G", "losses"), T)
        return update if ok is None else torch.where(ok, update, 0.0)

    def _check_inputs(self, G: torch.Tensor, losses: torch.Tensor | None) -> None:
        """Method-specific argument checks (before any state is touched)."""

    def propose_update(self, G: torch.Tensor, losses: torch.Tensor | None) -> Proposal:
        """The step on finite inputs (checked by the caller); state uncommitted."""
        if type(self).aggregate is not JacobianMethod.aggregate:
            return Proposal(self.aggregate(G, losses))  # a method written as aggregate() alone
        self._check_inputs(G, losses)
        before = self._current_state(G)
        proposal = Proposal(None, before=before)
        proposal.value, proposal.state = self._step(G, losses, before, proposal)
        return proposal

    def _step(self, G: torch.Tensor, losses: torch.Tensor | None,
              state: dict[str, torch.Tensor], proposal: Proposal
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Pure step: ``(update, new state)``; random draws register their undo in
        ``proposal``."""
        raise NotImplementedError

    def forward(self, G: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
        return self.aggregate(G, losses)


def check_matrix(method: Method, G: torch.Tensor) -> int:
    """Validate a ``(T, P)`` matrix of per-task gradients and return T."""
    name = type(method).__name__
    if not isinstance(G, torch.Tensor):
        raise TypeError(f"{name}: G must be a tensor of shape (T, P), got {type(G).__name__}")
    if G.dim() != 2 or G.shape[0] == 0:
        raise ValueError(f"{name}: G must have shape (T, P) with T > 0, got {tuple(G.shape)}")
    if not G.is_floating_point():
        raise TypeError(f"{name}: G must be floating point, got {G.dtype}")
    return G.shape[0]


def check_loss_vector(method: Method, losses: torch.Tensor) -> int:
    """Validate a 1-D tensor of T losses and return T."""
    name = type(method).__name__
    if not isinstance(losses, torch.Tensor):
        raise TypeError(f"{name}: losses must be a tensor of shape (T,), got {type(losses)}")
    if losses.dim() != 1 or losses.shape[0] == 0:
        raise ValueError(f"{name}: losses must have shape (T,) with T > 0, "
                         f"got {tuple(losses.shape)}")
    if not losses.is_floating_point():
        raise TypeError(f"{name}: losses must be floating point, got {losses.dtype}")
    return losses.shape[0]


class LossMethod(Method):
    """A method that only re-weights the losses; the engine does one ordinary backward.

    Built-in loss methods implement ``_step(losses, state) -> ((total, weights), new_state)``;
    one call of ``method(losses)`` or ``loss_weights(losses)`` is one training step (it
    advances the state once). ``last_weights`` keeps the last step's weights for logging.
    A method may instead override ``loss_weights`` alone (total ``sum_t w_t L_t``).
    """

    needs: ClassVar[str] = "losses"
    last_weights: torch.Tensor | None = None

    def _valid(self, losses: torch.Tensor) -> torch.Tensor:
        """0-d bool: the losses are valid input (finite; some methods need more)."""
        return torch.isfinite(losses).all()

    def _check_valid(self, losses: torch.Tensor) -> None:
        """Under "raise": ValueError for invalid losses (non-finite caught by the policy)."""

    def propose_losses(self, losses: torch.Tensor) -> Proposal:
        """The step on valid losses (checked by the caller); value ``(total, weights)``."""
        if type(self)._step is LossMethod._step:  # a method written as loss_weights() alone
            w = self.loss_weights(losses)
            return Proposal(((w * losses).sum(), w.detach()))
        before = self._current_state(losses)
        proposal = Proposal(None, before=before)
        value, after = self._step(losses, before, proposal)
        proposal.value, proposal.state = value, after
        return proposal

    def _step(self, losses: torch.Tensor, state: dict[str, torch.Tensor], proposal: Proposal
              ) -> tuple[tuple[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]:
        raise NotImplementedError

    def _standalone(self, *tensors: torch.Tensor | None, names: tuple[str, ...]
                    ) -> torch.Tensor | None:
        ok = super()._standalone(*tensors, names=names)
        if ok is not None:
            return ok & self._valid(tensors[0])
        self._check_valid(tensors[0])
        return None

    def _standalone_step(self, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = check_loss_vector(self, losses)

        def propose(ok: torch.Tensor | None) -> Proposal:
            if ok is None:
                return self.propose_losses(losses)
            proposal = self.propose_losses(torch.where(ok, losses, 1.0))
            total, weights = proposal.value
            proposal.value = (torch.where(ok, total, 0), torch.where(ok, weights, 0))
            return proposal

        (total, weights), _ = self._run(propose, (losses,), ("losses",), T)
        self.last_weights = weights.detach()
        return total, weights

    def loss_weights(self, losses: torch.Tensor) -> torch.Tensor:
        """One step; the weights ``w`` (T,), detached."""
        return self._standalone_step(losses)[1].detach()

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        """One step; the scalar total loss to back-propagate (``sum_t w_t L_t`` by default)."""
        if type(self)._step is LossMethod._step:
            return (self.loss_weights(losses) * losses).sum()
        return self._standalone_step(losses)[0]
