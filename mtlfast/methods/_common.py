"""Shared machinery of the Jacobian and loss methods: input checks, state allocated on first
use (so ``num_tasks`` need not be known at construction), and an owned random generator.

State that depends on T (EMAs, previous losses, logits) lives in buffers registered empty at
construction and allocated on the first call; ``load_state_dict`` into a fresh method resizes
them to the saved shapes first, so a saved method resumes with identical next steps.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .base import LossMethod, Method


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


def check_task_losses(method: Method, losses: torch.Tensor | None, T: int
                      ) -> torch.Tensor | None:
    """Validate the optional losses given with a (T, P) matrix: None or a (T,) float tensor."""
    if losses is not None and check_loss_vector(method, losses) != T:
        raise ValueError(f"{type(method).__name__}: losses must have shape ({T},) to match G, "
                         f"got {tuple(losses.shape)}")
    return losses


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor made on the host (random orders, a preference vector) on ``device`` without
    a host sync: to a CUDA device through pinned memory with a non-blocking copy (a pageable
    copy synchronizes)."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def check_pref_vector(pref_vector: object) -> torch.Tensor | None:
    """A method's optional task-preference vector: None or a 1-D tensor (ValueError otherwise)."""
    if pref_vector is not None and (not isinstance(pref_vector, torch.Tensor)
                                    or pref_vector.dim() != 1):
        raise ValueError("pref_vector must be a 1-D tensor of T task preferences")
    return pref_vector


def pref_on_device(pref_vector: torch.Tensor | None, gram: torch.Tensor) -> torch.Tensor | None:
    """The preference vector on the Gram's device (no host sync); ValueError on a T mismatch."""
    if pref_vector is None:
        return None
    if pref_vector.shape[0] != gram.shape[-1]:
        raise ValueError(f"pref_vector has {pref_vector.shape[0]} entries, "
                         f"the Gram {gram.shape[-1]} tasks")
    return host_to_device(pref_vector, gram.device)


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Running state is kept in at least float32 (EMAs in half precision drift)."""
    return torch.promote_types(dtype, torch.float32)


class LazyStateMixin:
    """Buffers named in ``lazy_buffers`` start empty and are sized on first use or on load."""

    lazy_buffers: ClassVar[tuple[str, ...]] = ()

    def _register_lazy_buffers(self) -> None:
        for name in self.lazy_buffers:
            self.register_buffer(name, torch.empty(0))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for name in self.lazy_buffers:
            saved = state_dict.get(prefix + name)
            current = getattr(self, name)
            if saved is not None and saved.shape != current.shape:
                setattr(self, name, torch.empty(saved.shape, dtype=saved.dtype,
                                                device=current.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class OwnedGeneratorMixin:
    """A ``torch.Generator`` owned by the method, created on the device of the data it draws
    for, seeded with ``seed`` (drawn from torch's global generator when None, so
    ``torch.manual_seed`` makes runs reproducible), and saved with the method's state.

    A generator lives on one device: moving the method's data to another device starts a fresh
    stream there from the same seed.
    """

    def _init_generator(self, seed: int | None) -> None:
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        if not isinstance(seed, int):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._pending_generator_state: tuple[str, torch.Tensor] | None = None

    def generator(self, device: torch.device) -> torch.Generator:
        """The method's generator on ``device`` (restored from a loaded state when it matches)."""
        device = torch.device(device)
        if self._generator is not None and self._generator.device == device:
            return self._generator
        gen = torch.Generator(device=device).manual_seed(self.seed)
        pending = self._pending_generator_state
        if pending is not None and torch.device(pending[0]) == device:
            gen.set_state(pending[1])
            self._pending_generator_state = None
        self._generator = gen
        return gen

    def get_extra_state(self) -> Any:
        state = super().get_extra_state()
        if self._generator is not None:
            saved = (str(self._generator.device), self._generator.get_state())
        else:
            saved = self._pending_generator_state
        state.update(seed=self.seed, generator=saved)
        return state

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        self.seed = state["seed"]
        self._generator = None
        self._pending_generator_state = state["generator"]


class LossStepMethod(LossMethod):
    """A loss method whose every call is one training step.

    ``loss_weights(losses)`` and ``forward(losses)`` run the same step (advance the state
    once) and differ in what they return: the detached weights ``w`` (T,) such that the
    gradient of the total is ``sum_t w_t grad L_t``, or the differentiable scalar total the
    engine back-propagates. Call one of them once per step; ``last_weights`` then holds the
    step's weights (for logging, e.g. the engine's StepInfo) without running another step.

    Non-finite policy: "raise" reads the device once to raise ``ValueError``; "skip" replaces
    invalid losses by 1 before computing (no NaN reaches the method's state or gradients),
    leaves the state as it was, and returns zero weights and a zero total whose gradient is 0.
    """

    def _valid(self, losses: torch.Tensor) -> torch.Tensor:
        return torch.isfinite(losses).all()

    def _raise_if_invalid(self, losses: torch.Tensor) -> None:
        self._raise_if_nonfinite(losses=losses)

    def _step(self, losses: torch.Tensor, ok: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(total, weights) for valid ``losses``; ``ok`` (skip mode) masks state updates."""
        raise NotImplementedError

    last_weights: torch.Tensor | None = None

    def _run(self, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.bind_tasks(check_loss_vector(self, losses))
        self._raise_if_invalid(losses)
        if self.on_nonfinite == "raise":
            total, weights = self._step(losses, None)
        else:
            ok = self._valid(losses)
            total, weights = self._step(torch.where(ok, losses, 1.0), ok)
            total, weights = torch.where(ok, total, 0), torch.where(ok, weights, 0)
        self.last_weights = weights.detach()
        return total, weights

    def loss_weights(self, losses: torch.Tensor) -> torch.Tensor:
        """One step; the weights ``w`` (T,), detached."""
        return self._run(losses)[1].detach()

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        """One step; the scalar total loss to back-propagate."""
        return self._run(losses)[0]
