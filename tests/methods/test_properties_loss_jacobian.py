"""Properties every loss method (needs="losses") and whole-matrix method (needs="jacobian")
must have. Each exported method joins through a factory below (some need T or options);
``test_every_method_is_covered`` fails when an exported one is missing.

A "run" drives a method through several steps, including its epoch boundaries and FAMO's
post-step update, so that every phase (DWA after two epochs, STCH after its warm-up) is hit.
"""

import copy
import io

import pytest
import torch

import mtlfast.methods as M

from ..conftest import no_host_sync

LOSS_FACTORIES = {
    "UW": lambda T, **kw: M.UW(T, init_log_var=-0.5, **kw),
    "DWA": lambda T, **kw: M.DWA(**kw),
    "RLW": lambda T, **kw: M.RLW(seed=7, **kw),
    "GLS": lambda T, **kw: M.GLS(**kw),
    "FAMO": lambda T, **kw: M.FAMO(**kw),
    "FAMO-next_batch": lambda T, **kw: M.FAMO(post_step_losses="next_batch", **kw),
    "STCH": lambda T, **kw: M.STCH(warmup_epochs=1, mu=0.5, **kw),
}
JACOBIAN_FACTORIES = {
    "GradDrop": lambda T, **kw: M.GradDrop(seed=3, **kw),
    "GradDrop-leak": lambda T, **kw: M.GradDrop(leak=[0.5] * T, seed=3, **kw),
    "MoCo": lambda T, **kw: M.MoCo(**kw),
    "MoCo-libmtl": lambda T, **kw: M.MoCo(lambda_update="softmax", normalize_grads=True, **kw),
    "DBMTL": lambda T, **kw: M.DBMTL(**kw),
    "ExcessMTL": lambda T, **kw: M.ExcessMTL(**kw),
    "ExcessMTL-fast": lambda T, **kw: M.ExcessMTL(robust_step_size=0.5, **kw),
}


def test_every_method_is_covered():
    exported = {getattr(M, n) for n in M.__all__ if isinstance(getattr(M, n), type)}
    ours = {c for c in exported if issubclass(c, (M.LossMethod, M.JacobianMethod))
            and c not in (M.LossMethod, M.JacobianMethod)}
    covered = {type(f(3)) for f in {**LOSS_FACTORIES, **JACOBIAN_FACTORIES}.values()}
    assert ours <= covered, ours - covered


def _losses(T, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(T, generator=g, dtype=torch.float64) + 0.5) * scale


def _matrix(T, P, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, P, generator=g, dtype=torch.float64)


def _loss_run(method, loss_seq, steps_per_epoch=2):
    """Drive a loss method; return the totals, weights and d total / d losses of each step."""
    out = []
    for k, L in enumerate(loss_seq):
        L = L.clone().requires_grad_(True)
        total = method(L)
        (dL,) = torch.autograd.grad(total, L, allow_unused=True)
        out.append((total.detach(), dL))
        if isinstance(method, M.FAMO) and method.post_step_losses == "extra_forward":
            method.update(L.detach() * 0.9)
        if (k + 1) % steps_per_epoch == 0 and hasattr(method, "epoch_end"):
            method.epoch_end()
    return out


def _jac_run(method, G_seq, L_seq):
    return [method(G, L) for G, L in zip(G_seq, L_seq, strict=True)]


LOSS_CASES = {
    "normal": lambda T, s: _losses(T, s),
    "tiny": lambda T, s: _losses(T, s, 1e-12),
    "huge": lambda T, s: _losses(T, s, 1e12),
    "mixed_scale": lambda T, s: _losses(T, s) * torch.logspace(-6, 6, T, dtype=torch.float64),
    "identical": lambda T, s: torch.full((T,), 0.7, dtype=torch.float64),
}


@pytest.mark.parametrize("name", LOSS_FACTORIES)
@pytest.mark.parametrize("case", LOSS_CASES)
@pytest.mark.parametrize("T", [1, 5])
def test_loss_finite_and_weights_are_the_gradient(name, case, T):
    """Finite totals, and ``loss_weights`` is exactly d total / d losses, in every phase."""
    seq = [LOSS_CASES[case](T, s) for s in range(8)]
    method = LOSS_FACTORIES[name](T)
    twin = copy.deepcopy(method)
    for k, ((total, dL), L) in enumerate(zip(_loss_run(method, seq), seq, strict=True)):
        w = twin.loss_weights(L)
        assert torch.equal(twin.last_weights, w)
        assert torch.isfinite(total) and torch.isfinite(dL).all(), (total, dL)
        torch.testing.assert_close(dL, w.to(dL.dtype), rtol=1e-9, atol=0)
        if isinstance(twin, M.FAMO) and twin.post_step_losses == "extra_forward":
            twin.update(L * 0.9)
        if hasattr(twin, "epoch_end") and k % 2 == 1:
            twin.epoch_end()


@pytest.mark.parametrize("name", JACOBIAN_FACTORIES)
@pytest.mark.parametrize(
    "case", ["full", "rank1", "tiny", "huge", "mixed_scale", "one_task", "zero_row", "all_zero",
             "identical_rows", "all_conflicting"],
)
def test_jacobian_finite_on_degenerate_input(name, case):
    T, P = 6, 40

    def make(seed):
        return {
            "full": lambda: _matrix(T, P, seed),
            "rank1": lambda: _matrix(T, 1, seed) @ _matrix(1, P, seed + 1),
            "tiny": lambda: _matrix(T, P, seed) * 1e-12,
            "huge": lambda: _matrix(T, P, seed) * 1e12,
            "mixed_scale": lambda: _matrix(T, P, seed)
            * torch.logspace(-6, 6, T, dtype=torch.float64)[:, None],
            "one_task": lambda: _matrix(1, P, seed),
            "zero_row": lambda: torch.cat([_matrix(T - 1, P, seed),
                                           torch.zeros(1, P, dtype=torch.float64)]),
            "all_zero": lambda: torch.zeros(T, P, dtype=torch.float64),
            "identical_rows": lambda: _matrix(1, P, seed).repeat(T, 1),
            "all_conflicting": lambda: torch.cat([_matrix(1, P, seed), -_matrix(1, P, seed)]),
        }[case]()

    G_seq = [make(s) for s in range(4)]
    method = JACOBIAN_FACTORIES[name](G_seq[0].shape[0])
    for d in _jac_run(method, G_seq, [_losses(G.shape[0], 1) for G in G_seq]):
        assert d.shape == (P,) and torch.isfinite(d).all(), d


def _round_trip(method):
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("name", LOSS_FACTORIES)
def test_loss_state_dict_round_trip(name):
    T = 4
    seq = [_losses(T, s) for s in range(10)]
    method = LOSS_FACTORIES[name](T)
    _loss_run(method, seq[:5])  # mid-epoch: a partial epoch sum is part of the state
    restored = LOSS_FACTORIES[name](T)
    restored.load_state_dict(_round_trip(method))
    twin = copy.deepcopy(method)
    for a, b in zip(_loss_run(restored, seq[5:]), _loss_run(twin, seq[5:]), strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("name", JACOBIAN_FACTORIES)
def test_jacobian_state_dict_round_trip(name):
    T, P = 4, 33
    G_seq = [_matrix(T, P, s) for s in range(6)]
    L_seq = [_losses(T, s) for s in range(6)]
    method = JACOBIAN_FACTORIES[name](T)
    _jac_run(method, G_seq[:3], L_seq[:3])
    restored = JACOBIAN_FACTORIES[name](T)
    restored.load_state_dict(_round_trip(method))
    twin = copy.deepcopy(method)
    for a, b in zip(_jac_run(restored, G_seq[3:], L_seq[3:]),
                    _jac_run(twin, G_seq[3:], L_seq[3:]), strict=True):
        assert torch.equal(a, b)


def _buffers(method):
    return {k: v.clone() for k, v in method.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("name", LOSS_FACTORIES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_loss_nonfinite_policy(name, bad):
    T = 3
    L = _losses(T, 0)
    L_bad = L.clone()
    L_bad[1] = bad
    method = LOSS_FACTORIES[name](T)
    method(L)
    with pytest.raises(ValueError, match="NaN or Inf"):
        method(L_bad)
    skipper = LOSS_FACTORIES[name](T, on_nonfinite="skip")
    skipper(L)
    before = _buffers(skipper)
    L_bad.requires_grad_(True)
    total = skipper(L_bad)
    (dL,) = torch.autograd.grad(total, L_bad, allow_unused=True)
    assert total.item() == 0 and (dL is None or torch.equal(dL, torch.zeros_like(dL)))
    assert torch.equal(skipper.loss_weights(L_bad.detach()), torch.zeros(T, dtype=L.dtype))
    if isinstance(skipper, M.UW):  # no NaN reaches the log-variances' gradient
        total = skipper(L_bad)
        (ds,) = torch.autograd.grad(total, skipper.log_var)
        assert torch.equal(ds, torch.zeros_like(ds))
    if isinstance(skipper, M.FAMO) and skipper.post_step_losses == "extra_forward":
        skipper.update(L_bad.detach())
        with pytest.raises(ValueError, match="NaN or Inf"):
            method.update(L_bad.detach())
    after = _buffers(skipper)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


@pytest.mark.parametrize("name", JACOBIAN_FACTORIES)
def test_jacobian_nonfinite_policy(name):
    T, P = 3, 12
    G, L = _matrix(T, P, 0), _losses(T, 0)
    G_bad = G.clone()
    G_bad[1, 4] = float("nan")
    method = JACOBIAN_FACTORIES[name](T)
    method(G, L)
    with pytest.raises(ValueError, match="NaN or Inf"):
        method(G_bad, L)
    skipper = JACOBIAN_FACTORIES[name](T, on_nonfinite="skip")
    skipper(G, L)
    before = _buffers(skipper)
    assert torch.equal(skipper(G_bad, L), torch.zeros(P, dtype=G.dtype))
    L_bad = L.clone()
    L_bad[0] = float("inf")
    assert torch.equal(skipper(G, L_bad), torch.zeros(P, dtype=G.dtype))
    after = _buffers(skipper)
    for k in before:
        assert torch.equal(before[k], after[k]), k


@pytest.mark.parametrize("name", [n for n in {**LOSS_FACTORIES, **JACOBIAN_FACTORIES}])
def test_task_count_mismatch(name):
    factory = {**LOSS_FACTORIES, **JACOBIAN_FACTORIES}[name]
    method = factory(3)
    if not method.stateful():
        pytest.skip("no state that depends on T")
    if name in JACOBIAN_FACTORIES:
        method(_matrix(3, 5, 0), _losses(3, 0))
        with pytest.raises(ValueError, match="T=3"):
            method(_matrix(4, 5, 0), _losses(4, 0))
    else:
        method(_losses(3, 0))
        with pytest.raises(ValueError, match="T=3"):
            method(_losses(4, 0))


@pytest.mark.parametrize("name", ["MoCo", "DBMTL", "ExcessMTL"])
def test_jacobian_width_mismatch(name):
    method = JACOBIAN_FACTORIES[name](3)
    method(_matrix(3, 5, 0), _losses(3, 0))
    with pytest.raises(ValueError, match="shape"):
        method(_matrix(3, 6, 0), _losses(3, 0))


NO_RNG = [n for n in LOSS_FACTORIES if n != "RLW"]


@pytest.mark.parametrize("name", NO_RNG)
def test_loss_no_host_sync_on_meta_device(name):
    """Every step (epoch boundaries aside) runs on meta tensors: no .item()/.cpu()/branch."""
    method = LOSS_FACTORIES[name](4, on_nonfinite="skip").to("meta")
    for _ in range(3):
        L = torch.empty(4, device="meta")
        assert method(L).device.type == "meta"
        assert method.loss_weights(L).shape == (4,)
        if isinstance(method, M.FAMO) and method.post_step_losses == "extra_forward":
            method.update(L)


@pytest.mark.parametrize("name", ["MoCo", "MoCo-libmtl", "DBMTL", "ExcessMTL"])
def test_jacobian_no_host_sync_on_meta_device(name):
    method = JACOBIAN_FACTORIES[name](4, on_nonfinite="skip")
    for _ in range(2):
        d = method(torch.empty(4, 9, device="meta"), torch.empty(4, device="meta"))
        assert d.shape == (9,) and d.device.type == "meta"


@pytest.mark.cuda
@pytest.mark.parametrize("name", [*LOSS_FACTORIES, *JACOBIAN_FACTORIES])
def test_no_host_sync_on_cuda(name):
    if name.startswith(("RLW", "GradDrop")):
        pytest.skip("rewinding its torch.Generator after a skipped step reads the flag "
                    "(documented: one synchronization per skip-mode step)")
    T, P = 4, 1000
    is_jac = name in JACOBIAN_FACTORIES
    method = {**LOSS_FACTORIES, **JACOBIAN_FACTORIES}[name](T, on_nonfinite="skip").cuda()
    G = torch.randn(T, P, device="cuda")
    L = torch.rand(T, device="cuda") + 0.5
    method(G, L) if is_jac else method(L)  # first call allocates state
    with no_host_sync():
        for _ in range(2):
            if is_jac:
                method(G, L)
            else:
                method(L)
                if isinstance(method, M.FAMO) and method.post_step_losses == "extra_forward":
                    method.update(L * 0.9)


def test_bad_input_rejected():
    with pytest.raises(TypeError, match="G must be a tensor"):
        M.MoCo()([[1.0]])
    with pytest.raises(ValueError, match=r"G must have shape \(T, P\)"):
        M.GradDrop()(torch.zeros(3))
    with pytest.raises(TypeError, match="G must be floating"):
        M.DBMTL()(torch.zeros(2, 3, dtype=torch.int64), torch.ones(2))
    with pytest.raises(ValueError, match="needs the losses"):
        M.DBMTL()(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"losses must have shape \(2,\)"):
        M.DBMTL()(torch.zeros(2, 3), torch.ones(3))
    with pytest.raises(ValueError, match=r"losses must have shape \(T,\)"):
        M.MoCo()(torch.zeros(2, 3), torch.ones(1, 2))
    with pytest.raises(ValueError, match=r"losses must have shape \(T,\)"):
        M.GLS()(torch.ones(2, 2))
    with pytest.raises(TypeError, match="losses must be floating"):
        M.RLW()(torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="positive"):
        M.GLS()(torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="leak"):
        M.GradDrop(leak=1.5)
    with pytest.raises(ValueError, match="temperature"):
        M.DWA(temperature=0.0)
    with pytest.raises(ValueError, match="nadir"):
        M.STCH(warmup_epochs=0)
    with pytest.raises(ValueError, match="lambda_update"):
        M.MoCo(lambda_update="proj")
    with pytest.raises(ValueError, match="num_tasks"):
        M.UW(0)
    with pytest.raises(RuntimeError, match="must follow a step"):
        M.FAMO().update(torch.ones(2))
    with pytest.raises(RuntimeError, match="do not call update"):
        M.FAMO(post_step_losses="next_batch").update(torch.ones(2))


def _drive(method, name, device, steps=5):
    """Run a method on a fixed float64 sequence on ``device``; return its outputs on the CPU."""
    T, P = 4, 257
    outs = []
    for k in range(steps):
        L = _losses(T, k).to(device)
        if name in JACOBIAN_FACTORIES:
            outs.append(method(_matrix(T, P, k).to(device), L).cpu())
            continue
        outs.append(method(L).cpu())
        if isinstance(method, M.FAMO) and method.post_step_losses == "extra_forward":
            method.update(L * 0.9)
        if hasattr(method, "epoch_end") and k % 2 == 1:
            method.epoch_end()
    return outs


RANDOM = ["RLW", "GradDrop", "GradDrop-leak"]


@pytest.mark.cuda
@pytest.mark.parametrize("name", [n for n in {**LOSS_FACTORIES, **JACOBIAN_FACTORIES}
                                  if n not in RANDOM])
def test_cuda_matches_cpu(name):
    factory = {**LOSS_FACTORIES, **JACOBIAN_FACTORIES}[name]
    for a, b in zip(_drive(factory(4).cuda(), name, "cuda"), _drive(factory(4), name, "cpu"),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.cuda
def test_cuda_random_methods_draw_from_their_cuda_generator():
    from mtlfast.ops.graddrop import graddrop_reference as graddrop_torch

    G = _matrix(4, 1000, 0).cuda()
    gen = torch.Generator(device="cuda").manual_seed(3)
    method = M.GradDrop(seed=3)
    for _ in range(2):
        u = torch.rand(1000, generator=gen, dtype=torch.float64, device="cuda")
        expected = graddrop_torch(G, u, torch.zeros(4, dtype=torch.float64, device="cuda"))
        assert torch.equal(method(G), expected)
    L = _losses(4, 0).cuda()
    rlw = M.RLW(seed=9)
    gen = torch.Generator(device="cuda").manual_seed(9)
    for _ in range(2):
        w = torch.softmax(torch.randn(4, generator=gen, dtype=torch.float64, device="cuda"), 0)
        assert torch.equal(rlw.loss_weights(L), w)


@pytest.mark.cuda
@pytest.mark.parametrize("name", [*LOSS_FACTORIES, *JACOBIAN_FACTORIES])
def test_cuda_state_dict_round_trip(name):
    factory = {**LOSS_FACTORIES, **JACOBIAN_FACTORIES}[name]
    method = factory(4).cuda()
    _drive(method, name, "cuda", steps=3)
    restored = factory(4).cuda()
    restored.load_state_dict(_round_trip(method))
    for a, b in zip(_drive(restored, name, "cuda"), _drive(method, name, "cuda"), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", [n for n in {**LOSS_FACTORIES, **JACOBIAN_FACTORIES}
                                  if n not in ("RLW", "UW")])
def test_permutation(name):
    """Renaming the tasks permutes the loss weights and leaves totals and updates unchanged
    (RLW draws per position, UW's parameters are per position: both excluded)."""
    factory = {**LOSS_FACTORIES, **JACOBIAN_FACTORIES}[name]
    perm = torch.tensor([2, 0, 3, 1])
    a, b = factory(4), factory(4)
    for k in range(6):
        L = _losses(4, k)
        if name in JACOBIAN_FACTORIES:
            G = _matrix(4, 19, k)
            torch.testing.assert_close(a(G, L), b(G[perm], L[perm]), rtol=1e-10, atol=1e-12)
            continue
        torch.testing.assert_close(a.loss_weights(L)[perm], b.loss_weights(L[perm]),
                                   rtol=1e-10, atol=0)
        after = L * torch.linspace(0.5, 1, 4, dtype=L.dtype)
        for m, x in ((a, after), (b, after[perm])):
            if isinstance(m, M.FAMO) and m.post_step_losses == "extra_forward":
                m.update(x)
            if hasattr(m, "epoch_end") and k % 2 == 1:
                m.epoch_end()
