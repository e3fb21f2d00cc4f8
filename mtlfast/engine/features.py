"""Features mode (MGDA-UB, Sener & Koltun 2018): the Gram of the feature Jacobian dL_t/dZ.

``K_Z = J_Z J_Z^T`` with ``J_Z`` the ``(T, numel(Z))`` per-task gradients of the losses with
respect to the shared representation Z. Its weights then drive ONE ordinary backward of
``sum_t w_t L_t`` through the trunk, so a step costs about an ordinary training step. It is a
different, cheaper objective than the Gram of the parameter gradients (MGDA-UB's upper bound),
not an approximation the engine corrects.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import ops

__all__ = ["feature_gram"]


def feature_gram(feature_jacobians: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_j J_j J_j^T`` over the feature tensors, each ``J_j`` of shape ``(T, *Z_j.shape)``."""
    grams = []
    for J in feature_jacobians:
        block = J.reshape(J.shape[0], -1)
        grams.append(ops.gram(block if block.dtype == torch.float64 else block.float()))
    return grams[0] if len(grams) == 1 else torch.stack(grams).sum(0)
