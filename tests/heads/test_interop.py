"""fuse_heads / unfuse round trips, state_dict interop with plain ModuleDict checkpoints, bad
input errors."""

import io

import pytest
import torch
from torch import nn

from mtlfast import FusedHeads, HeadSpec, fuse_heads
from tests.conftest import rel_err

D = 12


def _plain_mlp(widths, hidden, act=nn.ReLU, dropout=None):
    def head(n, h):
        layers = [nn.Linear(D, h), act()]
        if dropout is not None:
            layers.append(nn.Dropout(dropout))
        return nn.Sequential(*layers, nn.Linear(h, n))

    return nn.ModuleDict({f"t{i}": head(n, h) for i, (n, h) in enumerate(zip(widths, hidden,
                                                                              strict=True))})


def _same_outputs(a, b, z):
    out_a = a(z) if isinstance(a, FusedHeads) else {k: m(z) for k, m in a.items()}
    out_b = b(z) if isinstance(b, FusedHeads) else {k: m(z) for k, m in b.items()}
    assert out_a.keys() == out_b.keys()
    return max(rel_err(out_a[k], out_b[k]) for k in out_a)


@pytest.mark.parametrize("kind", ["linear", "mlp", "mlp_dropout", "gelu_nobias"])
def test_fuse_unfuse_round_trip(kind):
    if kind == "linear":
        plain = nn.ModuleDict({"a": nn.Linear(D, 1), "b": nn.Linear(D, 5), "c": nn.Linear(D, 33)})
    elif kind == "mlp":
        plain = _plain_mlp([1, 5, 33], [4, 16, 7])
    elif kind == "mlp_dropout":
        plain = _plain_mlp([1, 5, 33], [4, 16, 7], dropout=0.1)
    else:
        plain = nn.ModuleDict({t: nn.Sequential(nn.Linear(D, 6, bias=False), nn.GELU(),
                                                nn.Linear(6, n, bias=False))
                               for t, n in (("x", 2), ("y", 9))})
    plain.eval()
    fused = fuse_heads(plain).eval()
    z = torch.randn(7, D)
    assert _same_outputs(fused, plain, z) < 1e-6
    assert list(fused.state_dict()) == list(plain.state_dict())
    back = fused.unfuse()
    assert repr(back) == repr(plain)
    for (k1, v1), (k2, v2) in zip(back.state_dict().items(), plain.state_dict().items(),
                                  strict=True):
        assert k1 == k2 and torch.equal(v1, v2)


def test_fuse_module_list():
    plain = nn.ModuleList([nn.Linear(D, 2), nn.Linear(D, 3)])
    fused = fuse_heads(plain)
    assert fused.tasks == ("0", "1")
    assert list(fused.state_dict()) == list(plain.state_dict())
    assert isinstance(fused.unfuse(), nn.ModuleList)


class _Model(nn.Module):
    def __init__(self, heads):
        super().__init__()
        self.trunk = nn.Linear(5, D)
        self.heads = heads


def test_state_dict_interop_through_files():
    plain = _Model(_plain_mlp([1, 4, 20], [3, 8, 5]))
    fused = _Model(FusedHeads(D, {"t0": 1, "t1": 4, "t2": 20}, hidden=[3, 8, 5]))
    assert list(fused.state_dict()) == list(plain.state_dict())
    buf = io.BytesIO()
    torch.save(plain.state_dict(), buf)
    buf.seek(0)
    fused.load_state_dict(torch.load(buf))  # strict: every key consumed, none missing
    z = torch.randn(4, D)
    assert _same_outputs(fused.heads, plain.heads, z) < 1e-6
    # and back: a fused checkpoint loads into a fresh plain model
    with torch.no_grad():
        for p in fused.parameters():
            p.mul_(1.5)
    other = _Model(_plain_mlp([1, 4, 20], [3, 8, 5]))
    buf = io.BytesIO()
    torch.save(fused.state_dict(), buf)
    buf.seek(0)
    other.load_state_dict(torch.load(buf))
    assert _same_outputs(fused.heads, other.heads, z) < 1e-6


def test_partial_checkpoint_reports_unfused_key_names():
    fused = FusedHeads(D, {"a": 2, "b": 3})
    sd = fused.state_dict()
    del sd["b.bias"]
    with pytest.raises(RuntimeError, match=r"b\.bias"):
        fused.load_state_dict(sd)
    result = fused.load_state_dict(sd, strict=False)
    assert result.missing_keys == ["b.bias"] and result.unexpected_keys == []


def test_checkpoint_shape_mismatch_is_reported():
    fused = FusedHeads(D, {"a": 2, "b": 3})
    sd = FusedHeads(D, {"a": 2, "b": 4}).state_dict()
    with pytest.raises(RuntimeError, match="size mismatch for b.weight"):
        fused.load_state_dict(sd)


def test_optimizer_step_keeps_views_consistent():
    fused = FusedHeads(D, {"a": 2, "b": 3}, hidden=4)
    opt = torch.optim.SGD(fused.parameters(), lr=0.1)
    sum(v.sum() for v in fused(torch.randn(3, D)).values()).backward()
    opt.step()
    plain = fused.unfuse()
    z = torch.randn(3, D)
    assert _same_outputs(fused, plain, z) < 1e-6


@pytest.mark.parametrize("args,kwargs,err,match", [
    ((0, {"a": 1}), {}, ValueError, "in_features"),
    ((D, {}), {}, ValueError, "at least one task"),
    ((D, {"a": 0}), {}, ValueError, ">= 1"),
    ((D, [("a", 1), ("a", 2)]), {}, ValueError, "duplicate"),
    ((D, {"a.b": 1}), {}, ValueError, "without '.'"),
    ((D, {"a": 1.5}), {}, TypeError, "must be an int"),
    ((D, {"a": 1}), {"hidden": [2, 3]}, ValueError, "one int per task"),
    ((D, {"a": 1, "b": HeadSpec(2, hidden=3)}), {}, ValueError, "mixing"),
    ((D, {"a": 1}), {"activation": "tanh"}, ValueError, "activation"),
    ((D, {"a": 1}), {"dropout": 0.2}, ValueError, "dropout"),
    ((D, {"a": 1}), {"hidden": 4, "dropout": 1.0}, ValueError, "dropout"),
])
def test_bad_construction(args, kwargs, err, match):
    with pytest.raises(err, match=match):
        FusedHeads(*args, **kwargs)


def test_bad_forward_inputs():
    fused = FusedHeads(D, {"a": 1, "b": 2}, hidden=3)
    with pytest.raises(ValueError, match="in_features=12"):
        fused(torch.randn(4, D + 1))
    with pytest.raises(TypeError, match="dtype"):
        fused(torch.randn(4, D, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating"):
        fused(torch.ones(4, D, dtype=torch.long))
    with pytest.raises(ValueError, match="on meta"):
        fused(torch.randn(4, D, device="meta"))
    with pytest.raises(ValueError, match="keys"):
        fused({"a": torch.randn(4, D)})
    with pytest.raises(ValueError, match="per-task z"):
        fused(torch.randn(3, 4, D), per_task=True)
    with pytest.raises(ValueError, match="grad_outputs"):
        fused.task_feature_grads(torch.randn(4, 2), torch.randn(4, D))


def test_fuse_heads_rejects_mismatched_heads():
    with pytest.raises(ValueError, match="differs"):
        fuse_heads(nn.ModuleDict({"a": nn.Linear(D, 1), "b": nn.Linear(D + 1, 1)}))
    with pytest.raises(ValueError, match="expected nn.Linear"):
        fuse_heads(nn.ModuleDict({"a": nn.Conv1d(1, 1, 1)}))
    with pytest.raises(ValueError, match="approximate"):
        fuse_heads({"a": nn.Sequential(nn.Linear(D, 2), nn.GELU("tanh"), nn.Linear(2, 1))})
    with pytest.raises(ValueError, match="no heads"):
        fuse_heads(nn.ModuleDict())
    with pytest.raises(TypeError, match="ModuleDict"):
        fuse_heads(nn.Linear(D, 1))
