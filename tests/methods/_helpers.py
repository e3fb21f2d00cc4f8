"""Shared inputs of the per-method tests."""

import torch


def matrix(T, P, seed=0, dtype=torch.float64, scales=True):
    """A (T, P) matrix of task gradients with unequal norms (never zeros)."""
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(T, P, generator=g, dtype=torch.float64)
    if scales:
        G = G * torch.rand(T, 1, generator=g, dtype=torch.float64).add(0.3)
    return G.to(dtype)
