import contextlib
import os

import torch

# Without a GPU, Triton kernels run in its interpreter on CPU tensors. The flag is read when a
# kernel is decorated, so it must be set before any mtlfast Triton module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        # The marker, not item.keywords: keywords also hold directory names (a checkout in a
        # folder named "cuda" would skip everything).
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def count_calls(monkeypatch, owner, name: str) -> list:
    """Patch ``owner.name`` (a module function or a ``torch.ops.mtlfast`` kernel) to record
    each call in the returned list, then run the real one: which kernel a dispatch picked."""
    calls: list = []
    real = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *a: calls.append(1) or real(*a), raising=False)
    return calls


def devices():
    """CPU always, CUDA when present (the CUDA case carries the cuda mark)."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@contextlib.contextmanager
def no_host_sync():
    """CUDA: any host synchronization inside the block raises (after a synchronize before it)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _gram_methods() -> list[type]:
    import mtlfast.methods as M

    return sorted((getattr(M, n) for n in M.__all__
                   if isinstance(getattr(M, n), type) and issubclass(getattr(M, n), M.GramMethod)
                   and getattr(M, n) is not M.GramMethod), key=lambda c: c.__name__)


#: Every exported Gram method class, by name.
GRAM_METHODS = _gram_methods()
