"""Suites ``methods`` and ``weights``: a method on per-task gradients, whole and solver alone.

``methods``: aggregating a ``(T, P)`` matrix of per-task gradients into one update. Contenders
for each method mtlfast has (discovered from ``mtlfast.methods``): mtlfast's ``method(G)``
(Gram, T x T solve, combination), torchjd's aggregator of the same name, for PCGrad the
pairwise projection loop of the common reference code, and the floor: the least any method
reads and writes (``ops.gram`` + ``ops.combine`` for a Gram method, one ``G.sum(0)`` for a
whole-matrix method). Random methods (PCGrad's task order) are checked at T = 2, where the
order cannot matter, or replaying mtlfast's orders, and timed at every T. On CUDA the P sweep
adds P = 100M, where a step is bound by memory traffic (``params["bytes"]``: the bytes a Gram
method must move, for a floor at the measured copy bandwidth).

``weights``: the T x T solve alone, ``method.weights(K)`` of each Gram method against
torchjd's ``gramian_weighting(K)`` on the same Gram.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .. import baselines
from . import _contenders
from .harness import Case, Config, Contender, human

__all__ = ["cases", "discover_methods", "make_gradients", "weights_cases"]

#: Methods measured in --quick runs (whichever of them exist); full runs measure them all.
QUICK_METHODS = ("Mean", "UPGrad", "PCGrad", "MGDA", "CAGrad", "ExcessMTL", "MoDo", "SDMGrad",
                 "RGW")

#: Sizes per profile: a T sweep at fixed P and a P sweep at fixed T; the headline case.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"T": (2, 4), "P_at_T": 300, "P": (100, 1000), "T_at_P": 3, "headline": (4, 300)},
    "quick": {"T": (2, 8, 32), "P_at_T": 100_000, "P": (1_000, 10_000, 100_000), "T_at_P": 8,
              "headline": (32, 100_000)},
    "full": {"T": (2, 4, 8, 16, 32, 64), "P_at_T": 1_000_000,
             "P": (10_000, 100_000, 1_000_000, 10_000_000), "T_at_P": 8,
             "headline": (32, 1_000_000)},
}
#: the P sweep's extra point on CUDA: large enough that memory traffic, not launches, decides
CUDA_P = 100_000_000
#: the Gram sizes of the ``weights`` suite
WEIGHTS_T = {"tiny": (2, 4), "quick": (8, 32), "full": (2, 8, 32, 64)}

# torchjd's constructor keywords for an mtlfast method instance (its hyper-parameters, read
# from the instance where mtlfast stores them, else the paper's defaults).
_TORCHJD_KWARGS: dict[str, Callable[[Any, int], dict[str, Any]]] = {
    "CAGrad": lambda m, T: {"c": float(getattr(m, "c", 0.4))},
    "FairGrad": lambda m, T: {"alpha": float(getattr(m, "alpha", 1.0))},
    "NashMTL": lambda m, T: {"n_tasks": T, "max_norm": float(getattr(m, "max_norm", 1.0)),
                             "update_weights_every": int(getattr(m, "update_weights_every", 1))},
    "GradVac": lambda m, T: {"beta": float(getattr(m, "beta", 0.5))},
}


#: Tolerances (relative error of the update) where a contender is known to solve a slightly
#: different problem: torchjd adds reg_eps = 1e-4 to the diagonal of the normalised Gram
#: before its QP (UPGrad, DualProj), which moves the answer by about 1e-3 relative.
_RTOL = {"UPGrad": 1e-2, "DualProj": 1e-2}
_RTOL_NOTE = "tolerance 1e-2: torchjd regularises the Gram (reg_eps=1e-4) before its QP"


def discover_methods() -> dict[str, type]:
    """The methods of ``mtlfast.methods`` that aggregate a gradient matrix (Gram or whole-
    matrix methods; loss-based methods never see G)."""
    from .. import methods as mm

    bases = {mm.Method, mm.GramMethod, mm.JacobianMethod, mm.LossMethod}
    found = {}
    for name in getattr(mm, "__all__", dir(mm)):
        cls = getattr(mm, name, None)
        if (inspect.isclass(cls) and issubclass(cls, mm.Method) and cls not in bases
                and getattr(cls, "needs", None) in ("gram", "jacobian")):
            found[name] = cls
    return found


def make_gradients(T: int, P: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """``(T, P)`` float32 gradients with real conflicts: a shared direction whose sign
    alternates between tasks, plus independent noise of varied scale. Drawn on ``device``
    (a GPU draws P = 100M in milliseconds; the same numbers on every run of one device)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shared = torch.randn(P, generator=gen, device=device)
    signs = torch.tensor([1.0 if t % 2 == 0 else -0.6 for t in range(T)], device=device)
    scales = torch.linspace(0.5, 2.0, T, device=device)
    G = torch.randn(T, P, generator=gen, device=device).mul_(scales[:, None])
    return G.add_(2.0 * signs[:, None] * shared)


def torchjd_factory(name: str, method: Any, T: int) -> tuple[Callable[[], Any] | None, str]:
    """A builder of torchjd's aggregator for mtlfast method ``name`` (its options carried over),
    or None and why it is unavailable."""
    agg, why = _contenders.torchjd_aggregation()
    if agg is None:
        return None, why
    cls = getattr(agg, name, None)
    if cls is None:
        return None, f"torchjd has no {name}"
    kwargs = _TORCHJD_KWARGS.get(name, lambda m, T: {})(method, T)
    try:
        cls(**kwargs)
    except Exception as exc:  # e.g. NashMTL without cvxpy
        return None, f"torchjd {name}: {type(exc).__name__}: {exc}".splitlines()[0]
    return lambda: cls(**kwargs), ""


def _case_contenders(name: str, cls: type, G: torch.Tensor, G_check: torch.Tensor
                     ) -> list[Contender]:
    T = G.shape[0]
    timed_method = cls()
    out = [Contender("mtlfast", run=lambda: timed_method(G), check=lambda: cls()(G_check),
                     reference=True)]
    make_jd, why = torchjd_factory(name, timed_method, T)
    if make_jd is None:
        out.append(Contender("torchjd", unavailable=why))
    else:
        jd = make_jd()
        out.append(Contender("torchjd", run=lambda: jd(G), check=lambda: make_jd()(G_check),
                             note=_RTOL_NOTE if name in _RTOL else ""))
    if name == "PCGrad":
        out.append(_pairwise_loop(cls, timed_method, G, G_check))
    out.append(_floor(cls, G))
    return out


def _floor(cls: type, G: torch.Tensor) -> Contender:
    """The cheapest pass any method of this kind makes over G (timed, not checked)."""
    if cls.needs == "jacobian":
        return Contender("floor", run=lambda: G.sum(0), floor=True, note="G.sum(0): one read of G")
    from .. import ops

    w = torch.full((G.shape[0],), 1.0 / G.shape[0], device=G.device, dtype=G.dtype)

    def gram_combine() -> torch.Tensor:
        K = ops.gram(G)
        return ops.combine(w + 0 * K[0], G)  # the weights depend on K, as a method's do

    return Contender("floor", run=gram_combine, floor=True,
                     note="ops.gram + ops.combine: two reads of G, one write of P")


def _pairwise_loop(cls: type, timed_method: Any, G: torch.Tensor, G_check: torch.Tensor
                   ) -> Contender:
    """The pairwise PCGrad loop. When mtlfast's PCGrad exposes the task orders of its last
    call (``last_orders``), the loop replays them and is checked at full T; otherwise it is
    checked on ``G_check``, where the order cannot matter."""
    reduction = str(getattr(timed_method, "reduction", "sum"))
    note = "Python loop over task pairs, full-length projections"
    run = lambda: baselines.pcgrad_pairwise(G, reduction=reduction)  # noqa: E731
    probe = cls()
    probe(G_check)
    if getattr(probe, "last_orders", None) is None:
        return Contender("pairwise loop", run=run, note=note,
                         check=lambda: baselines.pcgrad_pairwise(G_check, reduction=reduction))
    orders: list[torch.Tensor] = []

    def expect() -> torch.Tensor:
        method = cls()
        answer = method(G)
        orders[:] = [method.last_orders]
        return answer

    return Contender("pairwise loop", run=run, expect=expect,
                     check=lambda: baselines.pcgrad_pairwise(G, orders=orders[0].tolist(),
                                                        reduction=reduction),
                     note=note + " (checked replaying mtlfast's task orders)")


def cases(cfg: Config) -> Iterator[Case]:
    """The case matrix for ``cfg``: every method at every (T, P) of the sweeps."""
    sizes = SIZES[cfg.sizes]
    sweeps: dict[tuple[int, int], tuple[str, ...]] = {}
    for T in sizes["T"]:
        sweeps[(T, sizes["P_at_T"])] = ("T",)
    extra = (CUDA_P,) if cfg.device.type == "cuda" and cfg.sizes != "tiny" else ()
    for P in (*sizes["P"], *extra):
        key = (sizes["T_at_P"], P)
        sweeps[key] = sweeps.get(key, ()) + ("P",)  # a point of both sweeps is run once
    methods = discover_methods()
    if cfg.sizes != "full":
        methods = {n: c for n, c in methods.items() if n in QUICK_METHODS} or methods
    for name, cls in methods.items():
        for (T, P), sweep in sweeps.items():
            yield Case(
                suite="methods", method=name, label=f"T={T} P={human(P)}",
                params={"T": T, "P": P, "dtype": "float32", "bytes": (2 * T + 1) * P * 4},
                sweeps=sweep,
                headline=(T, P) == tuple(sizes["headline"]),
                build=_builder(name, cls, T, P, cfg.device), rtol=_RTOL.get(name, 1e-3),
            )


def _builder(name: str, cls: type, T: int, P: int, device: torch.device
             ) -> Callable[[], list[Contender]]:
    def build() -> list[Contender]:
        G = make_gradients(T, P, device)
        G_check = G if getattr(cls, "deterministic", True) else G[:2].contiguous()
        return _case_contenders(name, cls, G, G_check)

    return build


def _torchjd_weighting(name: str, cls: type, T: int) -> tuple[Callable[[], Any] | None, str]:
    make_jd, why = torchjd_factory(name, cls(), T)
    if make_jd is None:
        return None, why
    if not hasattr(make_jd(), "gramian_weighting"):
        return None, f"torchjd's {name} has no gramian_weighting"
    return lambda: make_jd().gramian_weighting, ""


def weights_cases(cfg: Config) -> Iterator[Case]:
    """Every deterministic Gram method's weights from one Gram per T."""
    from .. import methods as mm

    for name, cls in discover_methods().items():
        if not issubclass(cls, mm.GramMethod) or not getattr(cls, "deterministic", True):
            continue
        if cfg.sizes != "full" and name not in QUICK_METHODS:
            continue
        for T in WEIGHTS_T[cfg.sizes]:
            yield Case(suite="weights", method=name, label=f"T={T}", params={"T": T},
                       sweeps=("T",), headline=T == max(WEIGHTS_T[cfg.sizes]),
                       build=_weights_builder(name, cls, T, cfg.device),
                       rtol=_RTOL.get(name, 1e-3))


def _weights_builder(name: str, cls: type, T: int, device: torch.device
                     ) -> Callable[[], list[Contender]]:
    def build() -> list[Contender]:
        from .. import ops

        K = ops.gram(make_gradients(T, 4096, device))
        method = cls()
        out = [Contender("mtlfast", run=lambda: method.weights(K), reference=True)]
        make_jd, why = _torchjd_weighting(name, cls, T)
        if make_jd is None:
            out.append(Contender("torchjd", unavailable=why))
        else:
            weighting = make_jd()
            out.append(Contender("torchjd", run=lambda: weighting(K),
                                 note=_RTOL_NOTE if name in _RTOL else ""))
        return out

    return build
