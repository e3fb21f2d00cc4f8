"""RGW (Lin et al., "Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task
Learning", TMLR 2022): random gradient weighting."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ._state import RandomStream, host_to_device
from .base import GramMethod, NonFinitePolicy

__all__ = ["RGW", "counter_normals"]

_M32 = 0xFFFFFFFF
_KEY = 0x9E3779B9  # golden-ratio constant: the key chain does not start at 0
_MUL = 0x45D9F3B


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash (xor-shift-multiply with the odd constant 0x45D9F3B,
    T. Mueller's): ``x < 2^32`` and the constant ``< 2^31``, so the int64 product never
    overflows."""
    x = ((x ^ (x >> 16)) * _MUL) & _M32
    x = ((x ^ (x >> 16)) * _MUL) & _M32
    return x ^ (x >> 16)


def counter_normals(state: torch.Tensor, shape: Sequence[int], device: torch.device
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard normal draws ``shape`` (float64) from the counter state ``[seed, step]`` and the
    advanced state ``[seed, step + 1]`` (the input is not modified).

    Pure tensor arithmetic on ``device``: no host read, the same numbers on every device, and a
    replayed CUDA graph draws new numbers. Draw ``n`` (row-major) uses four 32-bit words
    ``w_j = mix(mix((4 n + j) ^ k) ^ k)``, ``k`` the key chained from the seed's and the step's
    32-bit halves through ``mix`` (a bijective 32-bit hash); ``u_1 = (w_0 2^21 + w_1 / 2^11 + 1)
    / 2^53`` in ``(0, 1]``, ``u_2 = (w_2 2^21 + w_3 / 2^11) / 2^53`` and
    ``z = sqrt(-2 ln u_1) cos(2 pi u_2)`` (Box-Muller).
    """
    device = torch.device(device)
    state = host_to_device(state, device)
    seed, step = state[0], state[1]
    key = torch.full((), _KEY, dtype=torch.int64, device=device)
    for part in (seed & _M32, (seed >> 32) & _M32, step & _M32, (step >> 32) & _M32):
        key = _mix32(key ^ part)
    n = math.prod(shape)
    ctr = torch.arange(4 * n, dtype=torch.int64, device=device) & _M32
    words = _mix32(_mix32(ctr ^ key) ^ key).reshape(n, 4)
    hi, lo = words[:, 0::2] << 21, words[:, 1::2] >> 11
    bits = (hi | lo).to(torch.float64)
    u1 = (bits[:, 0] + 1) * 2.0**-53
    u2 = bits[:, 1] * 2.0**-53
    z = torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)
    advanced = torch.stack([seed, step + 1])
    return z.reshape(tuple(shape)), advanced


class RGW(GramMethod):
    """Random gradient weighting: ``w = softmax(z)``, ``z ~ N(0, I_T)`` drawn anew every step,
    ``d = w @ G`` (RLW's random weights applied to the task gradients instead of the losses).

    The paper's (and LibMTL's) default distribution, the standard normal through a softmax;
    the weights are on the simplex and ignore the Gram (``method(G)`` never forms it).

    Randomness: the counter-based state ``rng_state = [seed, step]`` (a buffer, in
    ``state_dict()``; ``seed`` None draws one from torch's global generator, so
    ``torch.manual_seed`` makes runs reproducible), advanced on the Gram's device by
    :func:`counter_normals`: no host read, a skipped step keeps the counter (its draw is
    taken again by the next step), and a replayed CUDA graph draws new weights. Deviation:
    LibMTL draws ``torch.randn(T)`` from torch's global generator (host state); the draws here
    are a different stream of standard normals (same distribution).
    """

    deterministic = False
    reads_gram = False

    def __init__(self, *, seed: int | None = None,
                 on_nonfinite: NonFinitePolicy = "raise") -> None:
        super().__init__(on_nonfinite=on_nonfinite)
        self.rng = RandomStream(seed)
        self.rng.register(self)

    @property
    def seed(self) -> int:
        return self.rng.seed

    def stateful(self) -> bool:
        return False  # the counter does not depend on T

    def _current_state(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"rng_state": host_to_device(self.rng_state, like.device)}

    def _step(self, gram, losses, state):
        z, counter = counter_normals(state["rng_state"], gram.shape[:-1], gram.device)
        return torch.softmax(z, dim=-1).to(gram.dtype), {"rng_state": counter}

    def extra_repr(self) -> str:
        return f"seed={self.seed}, {super().extra_repr()}"
