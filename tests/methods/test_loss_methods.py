"""UW, DWA, RLW, GLS, FAMO and STCH against plain float64 re-implementations of their papers'
updates (the authors' code where the paper leaves details open), and against the scalarizers
of torchjd 0.18 (UW, DWA, Random, GeometricMean, FAMO, STCH) on the same inputs."""

import math

import pytest
import torch

import mtlfast.methods as M

# torchjd is a test dependency, absent on the bare GPU machine: skip there, not fail to collect.
tjd = pytest.importorskip("torchjd.scalarization")


def _losses(T, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    L = torch.rand(T, generator=g, dtype=torch.float64) * 2 + 0.1
    return L.requires_grad_(requires_grad)


def _grad(total, L):
    return torch.autograd.grad(total, L)[0]


# ----------------------------------------------------------------------------- UW


def test_uw_matches_paper_and_torchjd():
    T = 4
    method = M.UW(T).double()
    with torch.no_grad():
        method.log_var.copy_(torch.tensor([-1.0, 0.0, 0.5, 2.0]))
    theirs = tjd.UW(T).double()
    with torch.no_grad():
        theirs.log_var.copy_(method.log_var)
    L = _losses(T, 0, requires_grad=True)
    s = method.log_var.detach()
    expected = sum(0.5 * math.exp(-s[i]) * L[i].item() + 0.5 * s[i].item() for i in range(T))
    ours = method(L)
    assert math.isclose(ours.item(), expected, rel_tol=1e-14)
    ours_dL, ours_ds = torch.autograd.grad(ours, [L, method.log_var])
    theirs_total = theirs(L)
    theirs_dL, theirs_ds = torch.autograd.grad(theirs_total, [L, theirs.log_var])
    torch.testing.assert_close(ours, theirs_total, rtol=1e-14, atol=0)
    torch.testing.assert_close(ours_dL, theirs_dL, rtol=1e-14, atol=0)
    torch.testing.assert_close(ours_ds, theirs_ds, rtol=1e-14, atol=0)


def test_uw_learns_the_loss_scale():
    """The optimum of exp(-s) L / 2 + s / 2 in s is s = log L (Kendall et al., eq. 7-8)."""
    L = torch.tensor([0.01, 1.0, 50.0], dtype=torch.float64)
    method = M.UW(3).double()
    opt = torch.optim.Adam(method.parameters(), lr=0.1)
    for _ in range(600):
        opt.zero_grad()
        method(L).backward()
        opt.step()
    torch.testing.assert_close(method.log_var.detach(), L.log(), rtol=0, atol=1e-3)


# ----------------------------------------------------------------------------- DWA


def dwa_paper(epochs, temperature):
    """Liu et al. 2019: per epoch, weights from the mean losses of the two previous epochs."""
    T = len(epochs[0][0])
    means, totals = [], []
    for batches in epochs:
        if len(means) >= 2:
            r = [means[-1][i] / means[-2][i] for i in range(T)]
            e = [math.exp(x / temperature) for x in r]
            w = [T * x / sum(e) for x in e]
        else:
            w = [1.0] * T
        totals += [sum(w[i] * L[i] for i in range(T)) for L in batches]
        means.append([sum(L[i] for L in batches) / len(batches) for i in range(T)])
    return totals


@pytest.mark.parametrize("temperature", [2.0, 0.5])
def test_dwa_matches_paper_and_torchjd(temperature):
    T = 3
    epochs = [[_losses(T, 10 * e + b) * (0.5**e) for b in range(3)] for e in range(5)]
    expected = dwa_paper([[L.tolist() for L in ep] for ep in epochs], temperature)
    method, theirs = M.DWA(temperature=temperature), tjd.DWA(temperature)
    ours_totals, theirs_totals = [], []
    for batches in epochs:
        for L in batches:
            ours_totals.append(method(L).item())
            theirs_totals.append(theirs(L).item())
        method.epoch_end()
        theirs.step()
    for a, b, c in zip(ours_totals, theirs_totals, expected, strict=True):
        assert math.isclose(a, c, rel_tol=1e-12) and math.isclose(b, c, rel_tol=1e-12)


def test_dwa_epoch_without_steps_changes_nothing():
    method = M.DWA()
    method.epoch_end()
    L = _losses(2, 0)
    method(L)
    method.epoch_end()
    method.epoch_end()  # empty epoch
    assert method.epochs_done == 1


# ----------------------------------------------------------------------------- RLW


def test_rlw_matches_paper_and_torchjd():
    """Same stream: torchjd's Random draws torch.randn(T) from the global generator; seeding
    it with our seed reproduces the draws of the owned generator (the only intentional
    difference is where the stream lives)."""
    T, seed = 5, 123
    method = M.RLW(seed=seed)
    gen = torch.Generator().manual_seed(seed)
    theirs = tjd.Random()
    torch.manual_seed(seed)
    for step in range(4):
        L = _losses(T, step)
        z = torch.randn(T, generator=gen, dtype=torch.float64)
        w = [math.exp(x) / sum(math.exp(y) for y in z.tolist()) for x in z.tolist()]
        expected = sum(w[i] * L[i].item() for i in range(T))
        ours = method(L).item()
        assert math.isclose(ours, expected, rel_tol=1e-13)
        assert math.isclose(ours, theirs(L).item(), rel_tol=1e-13)


def test_rlw_generator_is_owned():
    a, b = M.RLW(seed=1), M.RLW(seed=1)
    L = _losses(4, 0)
    wa = a.loss_weights(L)
    torch.randn(100)  # the global stream does not matter
    assert torch.equal(wa, b.loss_weights(L))
    assert not torch.equal(a.loss_weights(L), wa)  # the owned stream advances


# ----------------------------------------------------------------------------- GLS


def test_gls_matches_paper_and_torchjd():
    T = 6
    L = _losses(T, 3, requires_grad=True)
    ours = M.GLS()(L)
    expected = math.prod(L.tolist()) ** (1 / T)
    assert math.isclose(ours.item(), expected, rel_tol=1e-13)
    theirs = tjd.GeometricMean()(L)
    torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=0)
    torch.testing.assert_close(_grad(ours, L), _grad(theirs, L), rtol=1e-13, atol=0)


# ----------------------------------------------------------------------------- FAMO


class FamoPaper:
    """FAMO as in the official code (Cranial-XIX/FAMO): logits learned by torch.optim.Adam."""

    def __init__(self, T, lr, weight_decay):
        self.w = torch.zeros(T, dtype=torch.float64, requires_grad=True)
        self.opt = torch.optim.Adam([self.w], lr=lr, weight_decay=weight_decay)

    def total(self, L):
        self.prev = L.detach()
        z = torch.softmax(self.w, -1).detach()
        D = L + 1e-8
        c = (z / D).sum().detach()
        return (D.log() * z / c).sum()

    def update(self, L_after):
        delta = (self.prev + 1e-8).log() - (L_after + 1e-8).log()
        with torch.enable_grad():
            d = torch.autograd.grad(torch.softmax(self.w, -1), self.w, grad_outputs=delta)[0]
        self.opt.zero_grad()
        self.w.grad = d
        self.opt.step()


@pytest.mark.parametrize("weight_decay", [1e-3, 0.1])
def test_famo_extra_forward_matches_paper_and_torchjd(weight_decay):
    T, lr = 4, 0.3  # a large lr makes the logits move visibly in a few steps
    method = M.FAMO(lr=lr, weight_decay=weight_decay)
    paper = FamoPaper(T, lr, weight_decay)
    theirs = tjd.FAMO(T, lr=lr, weight_decay=weight_decay).double()
    for step in range(6):
        L = _losses(T, step, requires_grad=True)
        ours, ref, tj = method(L), paper.total(L), theirs(L)
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(_grad(ours, L), _grad(ref, L), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(ours, tj, rtol=1e-12, atol=1e-14)
        after = L.detach() * torch.linspace(0.5, 1.0, T, dtype=torch.float64)
        method.update(after)
        paper.update(after)
        theirs.update(after)
        torch.testing.assert_close(method.logits, paper.w.detach(), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(method.logits, theirs._w.detach(), rtol=1e-12, atol=1e-14)
    assert method.logits[-1] > method.logits[0]  # the task that decreased least gains weight


def test_famo_next_batch_variant():
    """The logits update of step k uses the losses of step k + 1 as the post-step losses."""
    T = 3
    method = M.FAMO(lr=0.2, post_step_losses="next_batch")
    paper = FamoPaper(T, 0.2, 1e-3)
    for step in range(5):
        L = _losses(T, step)
        if step > 0:
            paper.update(L)
        torch.testing.assert_close(method(L), paper.total(L), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(method.logits, paper.w.detach(), rtol=1e-12, atol=1e-14)


def test_famo_min_losses():
    b = torch.tensor([0.05, 0.0, 0.08], dtype=torch.float64)
    L = _losses(3, 1, requires_grad=True)
    theirs = tjd.FAMO(3, min_losses=b).double()
    ours = M.FAMO(min_losses=b)
    torch.testing.assert_close(ours(L), theirs(L), rtol=1e-13, atol=0)


# ----------------------------------------------------------------------------- STCH


class StchPaper:
    """The authors' MTL code (Xi-L/STCH, STCH_MTL): epochs < k sum of log-losses, epoch k the
    same while averaging the losses into the nadir point, then smooth Tchebycheff of the
    nadir-normalized log-losses, times T."""

    def __init__(self, mu, warmup_epoch):
        self.mu, self.warmup_epoch, self.epoch = mu, warmup_epoch, 0
        self.nadir, self.sum, self.count = None, 0.0, 0

    def total(self, L):
        T = L.shape[0]
        if self.epoch <= self.warmup_epoch:
            if self.epoch == self.warmup_epoch:
                self.sum, self.count = self.sum + L.detach(), self.count + 1
            return torch.log(L + 1e-20).sum()
        if self.nadir is None:
            self.nadir = self.sum / self.count
        f = torch.log(L / self.nadir + 1e-20)
        m = f.detach().max()
        # the authors' code drops the constant T * m (no effect on the gradient); added back
        # here so that the values compare too
        return self.mu * torch.log(torch.exp((f - m) / self.mu).sum()) * T + T * m


@pytest.mark.parametrize("mu", [1.0, 0.1])
def test_stch_matches_authors_code(mu):
    T, warmup_epoch = 3, 2
    method = M.STCH(mu=mu, warmup_epochs=warmup_epoch + 1)
    paper = StchPaper(mu, warmup_epoch)
    for epoch in range(6):
        for b in range(3):
            L = _losses(T, 10 * epoch + b, requires_grad=True) * 0.8**epoch
            ours, ref = method(L), paper.total(L)
            torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(_grad(ours, L), _grad(ref, L), rtol=1e-12, atol=1e-12)
        method.epoch_end()
        paper.epoch += 1
    torch.testing.assert_close(method.nadir, paper.nadir)


def test_stch_matches_torchjd():
    """torchjd's STCH is the generic mu logsumexp(p (f - z) / mu); ours applies it to
    f = log(L / nadir + eps) and scales by T as the authors' MTL code."""
    T, mu = 4, 0.3
    nadir = torch.tensor([1.0, 0.5, 2.0, 0.7], dtype=torch.float64)
    pref = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    method = M.STCH(mu=mu, warmup_epochs=0, nadir=nadir, preference=pref)
    theirs = tjd.STCH(mu, weights=pref)
    L = _losses(T, 5, requires_grad=True)
    ours = method(L)
    ref = T * theirs(torch.log(L / nadir + 1e-20))
    torch.testing.assert_close(ours, ref, rtol=1e-13, atol=0)
    torch.testing.assert_close(_grad(ours, L), _grad(ref, L), rtol=1e-13, atol=0)


def test_stch_approaches_weighted_max():
    """As mu -> 0 the total tends to T max_i p_i f_i (Tchebycheff)."""
    nadir = torch.ones(3, dtype=torch.float64)
    L = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)
    total = M.STCH(mu=1e-4, warmup_epochs=0, nadir=nadir)(L)
    assert math.isclose(total.item(), 3 * math.log(2.0), rel_tol=1e-3)
