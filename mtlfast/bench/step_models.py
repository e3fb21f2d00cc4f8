"""The three training-step models the ``step`` suite times whole (forward + the step's
backward), the workloads our users train:

- ``resnet``: a CelebA-like ResNet-18-style trunk (BatchNorm, four stages of two basic
  blocks, widths w-2w-4w-8w, global pooling) on 64x64 images, T=40 binary attribute heads;
- ``dense``: a NYUv2-like encoder-decoder (three stride-2 stages down, three upsampling stages
  back, BatchNorm) with three pixel-wise tasks: 13-class segmentation (cross-entropy), depth
  (L1) and surface normals (1 - cosine similarity);
- ``ranking``: a ranking tower, an MLP on 256 features, with T=8 binary objectives (click,
  like, share, ...: logistic losses).

Each model's losses come from its heads alone on the trunk's output ``z`` (the task graphs
meet only at ``z``, as torchjd's ``mtl_backward`` and mtlfast's features mode read them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MODELS", "ModelSpec", "TaskModel", "build"]


class TaskModel(nn.Module):
    """A shared ``trunk`` and per-task ``heads``; ``forward(x, y)`` returns the T losses and
    the trunk's output ``z``."""

    def __init__(self, trunk: nn.Module, heads: nn.ModuleList, kind: str) -> None:
        super().__init__()
        self.trunk, self.heads, self.kind = trunk, heads, kind

    def forward(self, x: torch.Tensor, y: torch.Tensor | tuple[torch.Tensor, ...]
                ) -> tuple[list[torch.Tensor], torch.Tensor]:
        z = self.trunk(x)
        out = [h(z) for h in self.heads]
        if self.kind == "dense":
            seg, depth, normals = y  # type: ignore[misc]
            n = F.normalize(out[2], dim=1)
            return [F.cross_entropy(out[0], seg), (out[1] - depth).abs().mean(),
                    1 - (n * normals).sum(1).mean()], z
        return [F.binary_cross_entropy_with_logits(o.squeeze(1), y[:, t])  # type: ignore[index]
                for t, o in enumerate(out)], z


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


def _resnet(width: int, tasks: int) -> TaskModel:
    widths = (width, 2 * width, 4 * width, 8 * width)
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                               nn.ReLU()]
    c_in = width
    for i, c in enumerate(widths):
        layers += [_BasicBlock(c_in, c, 1 if i == 0 else 2), _BasicBlock(c, c, 1)]
        c_in = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return TaskModel(nn.Sequential(*layers), nn.ModuleList(nn.Linear(c_in, 1)
                                                           for _ in range(tasks)), "resnet")


def _conv_bn(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


def _dense(width: int, tasks: int) -> TaskModel:
    if tasks != 3:
        raise ValueError("the dense model has its three NYUv2 tasks")
    w = (width, 2 * width, 4 * width)
    down = [*_conv_bn(3, w[0]), *_conv_bn(w[0], w[0], 2), *_conv_bn(w[0], w[1], 2),
            *_conv_bn(w[1], w[2], 2)]
    up: list[nn.Module] = []
    for c_in, c_out in ((w[2], w[1]), (w[1], w[0]), (w[0], w[0])):
        up += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
               *_conv_bn(c_in, c_out)]
    heads = nn.ModuleList([nn.Conv2d(w[0], 13, 1), nn.Conv2d(w[0], 1, 1),
                           nn.Conv2d(w[0], 3, 1)])
    return TaskModel(nn.Sequential(*down, *up), heads, "dense")


def _ranking(width: int, tasks: int) -> TaskModel:
    widths = (256, 4 * width, 2 * width, width)
    layers: list[nn.Module] = []
    for d_in, d_out in zip(widths, widths[1:], strict=False):
        layers += [nn.Linear(d_in, d_out), nn.ReLU()]
    return TaskModel(nn.Sequential(*layers), nn.ModuleList(nn.Linear(width, 1)
                                                           for _ in range(tasks)), "ranking")


@dataclass(frozen=True)
class ModelSpec:
    """A model at one size: ``width`` (the trunk's base width), ``tasks``, ``batch`` and the
    input ``image`` side (0: feature vectors)."""

    kind: str
    width: int
    tasks: int
    batch: int
    image: int

    def label(self) -> str:
        what = {"resnet": "ResNet-18-style + BN", "dense": "encoder-decoder + BN",
                "ranking": "ranking MLP 256-in"}[self.kind]
        size = f", {self.image}x{self.image}" if self.image else ""
        return f"{what} w={self.width}, T={self.tasks}, B={self.batch}{size}"


#: name -> {sizes: spec}: "gpu" the issue's sizes (CUDA runs), "cpu" scaled to a 2-core CPU
#: (full runs), "tiny" for tests
MODELS: dict[str, dict[str, ModelSpec]] = {
    "(a) CelebA-like": {"gpu": ModelSpec("resnet", 64, 40, 256, 64),
                        "cpu": ModelSpec("resnet", 16, 40, 16, 64),
                        "tiny": ModelSpec("resnet", 2, 3, 2, 16)},
    "(b) NYUv2-like": {"gpu": ModelSpec("dense", 32, 3, 8, 128),
                       "cpu": ModelSpec("dense", 16, 3, 2, 64),
                       "tiny": ModelSpec("dense", 2, 3, 2, 16)},
    "(c) ranking": {"gpu": ModelSpec("ranking", 256, 8, 4096, 0),
                    "cpu": ModelSpec("ranking", 256, 8, 512, 0),
                    "tiny": ModelSpec("ranking", 4, 3, 8, 0)},
}
_BUILDERS = {"resnet": _resnet, "dense": _dense, "ranking": _ranking}


def build(spec: ModelSpec, device: torch.device, seed: int = 0
          ) -> tuple[TaskModel, torch.Tensor, torch.Tensor | tuple[torch.Tensor, ...]]:
    """The model (seeded weights) on ``device`` and one fixed batch ``(x, y)`` for it."""
    torch.manual_seed(seed)
    model = _BUILDERS[spec.kind](spec.width, spec.tasks).to(device)
    gen = torch.Generator().manual_seed(seed + 1)
    B, S = spec.batch, spec.image
    y: torch.Tensor | tuple[torch.Tensor, ...]
    if spec.kind == "ranking":
        x = torch.randn(B, 256, generator=gen)
        y = torch.randint(0, 2, (B, spec.tasks), generator=gen).float()
    else:
        x = torch.randn(B, 3, S, S, generator=gen)
        if spec.kind == "resnet":
            y = torch.randint(0, 2, (B, spec.tasks), generator=gen).float()
        else:
            y = (torch.randint(0, 13, (B, S, S), generator=gen),
                 torch.rand(B, 1, S, S, generator=gen),
                 F.normalize(torch.randn(B, 3, S, S, generator=gen), dim=1))
    if isinstance(y, tuple):
        return model, x.to(device), tuple(t.to(device) for t in y)
    return model, x.to(device), y.to(device)
