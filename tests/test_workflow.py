"""Method lookup by name, and what a step reports for logging."""

import pytest
import torch

import mtlfast
import mtlfast.methods as M

from .engine.models import MLPModel, data


def test_every_exported_method_is_available_by_name():
    exported = {n for n in M.__all__ if isinstance(getattr(M, n), type)
                and issubclass(getattr(M, n), M.Method)
                and getattr(M, n) not in (M.Method, M.GramMethod, M.JacobianMethod, M.LossMethod)}
    assert M.available() == sorted(n.lower() for n in exported)
    for name in M.available():
        assert type(M.get(name, num_tasks=3)).__name__.lower() == name


@pytest.mark.parametrize(("name", "cls"), [("IMTL-G", M.IMTLG), ("nash_mtl", M.NashMTL),
                                           ("Aligned MTL", M.AlignedMTL), ("ls", M.Sum),
                                           ("UPGrad", M.UPGrad)])
def test_names_are_forgiving(name, cls):
    assert type(M.get(name)) is cls


def test_get_passes_options_and_rejects_bad_names():
    assert M.get("cagrad", c=0.7).c == 0.7
    assert M.get("uw", num_tasks=4).log_var.shape == (4,)
    with pytest.raises(ValueError, match="method must be one of"):
        M.get("nosuch")
    with pytest.raises(ValueError, match="num_tasks=T"):
        M.get("uw")
    with pytest.raises(TypeError, match="str"):
        M.get(3)


def test_the_engine_takes_a_method_name():
    torch.manual_seed(0)
    model = MLPModel()
    engine = mtlfast.MTLBackward(model.trunk, "pcgrad")
    assert isinstance(engine.method, M.PCGrad)
    losses, _ = model(*data(model))
    mtlfast.backward(losses, model.trunk, "nashmtl")
    first = mtlfast.api._CACHE[0].method
    losses, _ = model(*data(model, seed=1))
    mtlfast.backward(losses, model.trunk, "nashmtl")  # the same name keeps the same method
    assert mtlfast.api._CACHE[0].method is first and first._calls == 2
    with pytest.raises(TypeError, match="method name"):
        mtlfast.MTLBackward(model.trunk, 3.0)
    with pytest.raises(TypeError, match=r"pass UPGrad\(...\)"):
        mtlfast.MTLBackward(model.trunk, M.UPGrad)


def test_step_info_views_for_logging():
    torch.manual_seed(0)
    model = MLPModel()
    x, y = data(model)
    losses, _ = model(x, y)
    named = dict(zip("abc", losses, strict=True))
    info = mtlfast.backward(named, model.trunk, M.UPGrad())
    assert info.tasks == ["a", "b", "c"]
    K = info.gram
    torch.testing.assert_close(info.grad_norms(), K.diagonal().sqrt())
    cos = info.cosines()
    torch.testing.assert_close(cos.diagonal(), torch.ones(3, dtype=K.dtype))
    torch.testing.assert_close(cos, K / torch.outer(K.diagonal().sqrt(), K.diagonal().sqrt()))
    assert int(info.conflicting_pairs()) == int((torch.triu(cos, 1) < 0).sum())
    d = info.as_dict()
    assert d["mode"] == "jacobian" and d["skipped"] is False
    assert set(d["losses"]) == set(d["weights"]) == set(d["grad_norms"]) == {"a", "b", "c"}
    assert len(d["cosine"]) == 3 and isinstance(d["conflicting_pairs"], int)


def test_step_info_of_a_loss_method_has_no_gram_views():
    model = MLPModel()
    losses, _ = model(*data(model))
    d = mtlfast.backward(losses, model.trunk, M.RLW(seed=0)).as_dict()
    assert d["cosine"] is None and d["grad_norms"] is None and d["conflicting_pairs"] is None
    assert list(d["weights"]) == ["task 0", "task 1", "task 2"]
