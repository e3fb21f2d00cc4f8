"""Method state in one scheme: lazily shaped buffers, one proposal/commit protocol, one RNG.

A step of a method is a pure function of its inputs and its current state; it returns a
:class:`Proposal` (the result plus the state it *would* leave). The caller commits the proposal
only once the step has succeeded (:func:`commit`), so a failed or skipped step changes nothing:

- ``ok`` known on the host (``None``/``True``/``False``): the new state is assigned, or
  nothing happens at all;
- ``ok`` a flag tensor (the sync-free skip policy): each state tensor becomes
  ``torch.where(ok, new, old)`` on the device, with no host read. A ``torch.Generator``'s
  position cannot be selected on the device, so a method that draws from one (RLW, GradDrop)
  reads the flag then: one synchronization on an accelerator, documented on the method.

State tensors are buffers named in ``state_names``; they are ``None`` (absent from
``state_dict``) until the first step, which sizes them from its inputs, and ``load_state_dict``
into a fresh method sizes them from the saved tensors.

Randomness: :class:`RandomStream`, one per randomized method, seeded by ``seed`` (drawn from
torch's global generator when None, so ``torch.manual_seed`` makes runs reproducible).
Permutations come from a counter-based Philox state ``[seed, step]`` kept as a buffer on the
data's device (no host sync, replayable in CUDA graphs); uniform and normal draws come from an
owned ``torch.Generator`` (the same stream as ``torch.rand`` / ``torch.randn`` seeded with
``seed``, which torchjd and LibMTL draw from), whose position is host state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "Proposal",
    "RandomStream",
    "as_pref_vector",
    "commit",
    "discard",
    "host_to_device",
    "pref_on_device",
    "pref_weights",
    "state_dtype",
]


@dataclass
class Proposal:
    """What one step of a method computed and would change, not yet committed."""

    #: The step's result: weights (Gram methods), the update (whole-Jacobian methods), or
    #: ``(total, weights)`` (loss methods).
    value: Any
    #: State tensors after the step, by buffer name.
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    #: State tensors before the step (what a device-side skip keeps).
    before: dict[str, torch.Tensor] = field(default_factory=dict)
    #: Host-side attributes after the step (set on commit).
    host: dict[str, Any] = field(default_factory=dict)
    #: Undo actions for host-side effects the step already made (a generator's draws).
    rollback: list[Callable[[], None]] = field(default_factory=list)


def commit(module: torch.nn.Module, proposal: Proposal, ok: torch.Tensor | bool | None) -> None:
    """Apply ``proposal`` to ``module`` if the step succeeded (``ok``), else undo its effects.

    A flag tensor is never read for tensor state (selected on its device, even on the CPU, so
    a step reads nothing back); host bookkeeping (FAMO's "a step ran" flags) follows the
    attempted step then; only an undo (a generator's draws) needs the value: one read (none for
    meta tensors, which have no value).
    """
    outcome = True if ok is None else ok if isinstance(ok, bool) else None
    if outcome is None and proposal.rollback and ok.device.type != "meta":
        outcome = bool(ok)
    if outcome is False:
        discard(proposal)
        return
    for name, new in proposal.state.items():
        if outcome is None and name in proposal.before:  # else informational (last_orders)
            new = torch.where(ok, new, proposal.before[name])
        current = getattr(module, name, None)
        if isinstance(current, torch.Tensor) and current.shape == new.shape \
                and current.dtype == new.dtype and current.device == new.device:
            current.copy_(new)  # in place: a captured CUDA graph keeps updating the same buffer
        else:
            setattr(module, name, new.clone())  # never the step's result itself (in-place later)
    for name, value in proposal.host.items():
        setattr(module, name, value)
    proposal.rollback.clear()


def discard(proposal: Proposal) -> None:
    """Undo the host-side effects of a proposal that will not be committed."""
    for undo in reversed(proposal.rollback):
        undo()
    proposal.rollback.clear()


def load_lazy_buffers(module: torch.nn.Module, names: Sequence[str], state_dict: dict,
                      prefix: str) -> None:
    """Before ``load_state_dict``: size each lazy buffer like its saved tensor (absent: None)."""
    for name in names:
        saved = state_dict.get(prefix + name)
        module._buffers[name] = None if saved is None else torch.empty_like(
            saved, device=_device_of(module, saved))


def _device_of(module: torch.nn.Module, saved: torch.Tensor) -> torch.device:
    for t in module.buffers():
        return t.device
    return saved.device


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Running state is kept in at least float32 (EMAs in half precision drift)."""
    return torch.promote_types(dtype, torch.float32)


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor made on the host on ``device`` without a host sync: to a CUDA device through
    pinned memory with a non-blocking copy (a pageable copy synchronizes)."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class RandomStream:
    """A method's randomness: a seed, a Philox counter for permutations, a generator stream.

    ``seed`` None draws one from torch's global generator. The Philox state ``[seed, step]``
    lives in the owner's buffer ``rng_state`` (see :meth:`register`); the generator stream
    (``uniform`` / ``normal``) is created on the device of the data it draws for, from the same
    seed, and its position is saved with the owner's extra state.
    """

    def __init__(self, seed: int | None) -> None:
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"seed must be an int in [0, 2^63) or None, got {seed!r}")
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._saved: tuple[str, torch.Tensor] | None = None  # a loaded position, not yet used

    def register(self, module: torch.nn.Module) -> None:
        """Give ``module`` the counter buffer ``rng_state = [seed, 0]`` (in its state_dict)."""
        module.register_buffer("rng_state", torch.tensor([self.seed, 0], dtype=torch.int64))

    # -- permutations: the counter-based Philox state ---------------------------------------

    @staticmethod
    def orders(state: torch.Tensor, shape: Sequence[int], device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random permutations ``(*shape, T)`` (T = shape[-1]) of ``0..T-1`` and the advanced
        counter (the input is not modified: commit the returned one)."""
        from ..ops import solvers  # methods import ops, ops never import methods

        T = shape[-1]
        device = torch.device(device)
        if device.type == "meta":
            return torch.empty((*shape, T), dtype=torch.int64, device=device), state
        work = host_to_device(state, device).clone()
        out = solvers.pcgrad_orders(work, math.prod(shape[:-1]), T).reshape(*shape, T)
        return out, work

    # -- uniform / normal draws: an owned torch.Generator ------------------------------------

    def generator(self, device: torch.device) -> torch.Generator:
        """The stream's generator on ``device`` (restored from a loaded state when it matches;
        another device starts a fresh stream there from the same seed)."""
        device = torch.device(device)
        if self._generator is not None and self._generator.device == device:
            return self._generator
        gen = torch.Generator(device=device).manual_seed(self.seed)
        if self._saved is not None and torch.device(self._saved[0]) == device:
            gen.set_state(self._saved[1])
            self._saved = None
        self._generator = gen
        return gen

    def draw(self, proposal: Proposal, device: torch.device,
             fn: Callable[[torch.Generator], torch.Tensor]) -> torch.Tensor:
        """``fn(generator)`` on ``device``, undone by ``proposal``'s rollback if not committed."""
        if torch.device(device).type == "meta":
            return fn(None)
        gen = self.generator(device)
        before = gen.get_state()
        proposal.rollback.append(lambda: gen.set_state(before))
        return fn(gen)

    def state(self) -> dict[str, Any]:
        gen = self._generator
        saved = (str(gen.device), gen.get_state()) if gen is not None else self._saved
        return {"seed": self.seed, "generator": saved}

    def load(self, state: dict[str, Any]) -> None:
        self.seed = state["seed"]
        self._generator = None
        self._saved = state.get("generator")


# -- task preference vectors ---------------------------------------------------------------


def as_pref_vector(pref_vector: Sequence[float] | torch.Tensor | None) -> torch.Tensor | None:
    """A method's optional task preferences: None, or a 1-D float64 tensor of finite
    non-negative numbers (ValueError otherwise)."""
    if pref_vector is None:
        return None
    try:
        p = torch.as_tensor(pref_vector, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"pref_vector must be a 1-D sequence of numbers, got {pref_vector!r}"
                         ) from exc
    if p.dim() != 1 or p.numel() == 0 or not bool(torch.isfinite(p).all()) \
            or bool((p < 0).any()):
        raise ValueError("pref_vector must be a 1-D sequence of finite non-negative numbers, "
                         f"got {pref_vector!r}")
    return p


def pref_on_device(pref_vector: torch.Tensor | None, gram: torch.Tensor) -> torch.Tensor | None:
    """The preference vector ``(T,)`` on the Gram's device and dtype (no host sync); None stays
    None. ValueError on a T mismatch."""
    if pref_vector is None:
        return None
    T = gram.shape[-1]
    if pref_vector.shape != (T,):
        raise ValueError(f"pref_vector has {pref_vector.shape[0]} entries, the Gram {T} tasks")
    return host_to_device(pref_vector.to(gram.dtype), gram.device)


def pref_weights(pref_vector: torch.Tensor | None, gram: torch.Tensor) -> torch.Tensor:
    """The preferences broadcast to the Gram's batch ``(..., T)``: ``1/T`` each when None."""
    p = pref_on_device(pref_vector, gram)
    if p is None:
        T = gram.shape[-1]
        return torch.full(gram.shape[:-1], 1.0 / T, dtype=gram.dtype, device=gram.device)
    return p.expand(gram.shape[:-1])
