"""Small multi-task models, test-local methods, and the per-task-loop reference for the engine."""

from __future__ import annotations

import torch
from torch import nn

from mtlfast.methods import GramMethod, JacobianMethod, LossMethod


class Normalized(GramMethod):
    """Test-local Gram method: unit-norm task gradients, ``w_t = 1 / ||g_t||`` (nonlinear in K)."""

    def _weights(self, gram, losses):
        return gram.diagonal(dim1=-2, dim2=-1).clamp_min(1e-12).rsqrt()


class Projected(GramMethod):
    """Test-local projection method: ``w = sum_t (e_t + max(0, -K_ts/K_ss) e_s)`` over s != t,
    i.e. each task gradient plus the removal of its conflicts (a one-shot PCGrad)."""

    def _weights(self, gram, losses):
        T = gram.shape[-1]
        diag = gram.diagonal(dim1=-2, dim2=-1).clamp_min(1e-12)
        coef = (-gram / diag.unsqueeze(-2)).clamp_min(0.0)  # coef[t, s] for projecting t on s
        coef = coef * (1 - torch.eye(T, dtype=gram.dtype, device=gram.device))
        return 1.0 + coef.sum(-2)


class LayerwiseNormalized(Normalized):
    """Normalized per parameter: exercises ``granularity = "parameter"``."""

    granularity = "parameter"


class Median(JacobianMethod):
    """Test-local whole-Jacobian method: coordinate-wise median of the task gradients."""

    def aggregate(self, G, losses=None):
        return G.median(dim=0).values


class FixedLossWeights(LossMethod):
    def loss_weights(self, losses):
        return torch.arange(1, losses.shape[0] + 1, dtype=losses.dtype, device=losses.device)


class RunningMean(Normalized):
    """A stateful Gram method: weights blend with a running mean kept in a buffer."""

    def __init__(self, num_tasks=3):
        super().__init__()
        self.register_buffer("avg", torch.zeros(num_tasks, dtype=torch.float64))

    def stateful(self):
        return True

    def _weights(self, gram, losses):
        self.avg = 0.5 * self.avg + 0.5 * super()._weights(gram, losses).to(self.avg.dtype)
        return self.avg.clone()


class MLPModel(nn.Module):
    def __init__(self, d_in=5, d_hidden=7, tasks=3, dtype=torch.float64):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(d_in, d_hidden), nn.Tanh(),
                                   nn.Linear(d_hidden, d_hidden), nn.ReLU()).to(dtype)
        self.heads = nn.ModuleList(nn.Linear(d_hidden, 1).to(dtype) for _ in range(tasks))

    def forward(self, x, y):
        z = self.trunk(x)
        losses = [((h(z).squeeze(-1) - y[:, t]) ** 2).mean() for t, h in enumerate(self.heads)]
        return losses, z


class CNNModel(nn.Module):
    def __init__(self, tasks=4, dtype=torch.float64):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.3),
            nn.Conv2d(6, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten()).to(dtype)
        self.heads = nn.ModuleList(nn.Linear(32, 1).to(dtype) for _ in range(tasks))

    def forward(self, x, y):
        z = self.trunk(x)
        losses = [nn.functional.binary_cross_entropy_with_logits(h(z).squeeze(-1), y[:, t])
                  for t, h in enumerate(self.heads)]
        return losses, z


class LSTMModel(nn.Module):
    def __init__(self, tasks=3, dtype=torch.float64):
        super().__init__()
        self.lstm = nn.LSTM(4, 6, batch_first=True).to(dtype)
        self.heads = nn.ModuleList(nn.Linear(6, 1).to(dtype) for _ in range(tasks))

    def forward(self, x, y):
        out, _ = self.lstm(x)
        z = out[:, -1]
        losses = [((h(z).squeeze(-1) - y[:, t]) ** 2).mean() for t, h in enumerate(self.heads)]
        return losses, z


def data(model, batch=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    tasks = len(model.heads)
    if isinstance(model, CNNModel):
        x = torch.randn(batch, 3, 6, 6, generator=g, dtype=dtype)
        y = torch.randint(0, 2, (batch, tasks), generator=g).to(dtype)
    elif isinstance(model, LSTMModel):
        x = torch.randn(batch, 5, 4, generator=g, dtype=dtype)
        y = torch.randn(batch, tasks, generator=g, dtype=dtype)
    else:
        x = torch.randn(batch, 5, generator=g, dtype=dtype)
        y = torch.randn(batch, tasks, generator=g, dtype=dtype)
    return x, y


def shared_params(model):
    return [p for n, p in model.named_parameters() if not n.startswith("heads.")]


def grads(model):
    return {n: (None if p.grad is None else p.grad.detach().clone())
            for n, p in model.named_parameters()}


def reference_step(losses, shared, method, *, head_params):
    """The hand-written per-task loop (LibMTL pattern): T backward passes, flatten, method."""
    G = torch.stack([
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared, retain_graph=True)])
        for loss in losses
    ])
    L = torch.stack([loss.detach() for loss in losses])
    if getattr(method, "granularity", "matrix") == "parameter":
        bounds = torch.tensor([0] + [p.numel() for p in shared]).cumsum(0).tolist()
        blocks = [G[:, a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        W = method.weights(torch.stack([b @ b.T for b in blocks]), L)  # (L, T), one call
        update = torch.cat([w @ b for w, b in zip(W, blocks, strict=True)])
    elif method.needs == "jacobian":
        update = method.aggregate(G, L)
    else:
        update = method.weights(G @ G.T, L) @ G
    head = torch.autograd.grad(sum(losses), head_params, allow_unused=True)
    offset = 0
    for p in shared:
        g = update[offset:offset + p.numel()].view_as(p)
        p.grad = g.clone() if p.grad is None else p.grad + g
        offset += p.numel()
    for p, g in zip(head_params, head, strict=True):
        if g is not None:
            p.grad = g.clone() if p.grad is None else p.grad + g
