"""Issue 6: on CUDA, every Gram method's weights(K) makes no host synchronization (with the
"skip" non-finite policy, the one that promises never to read the device)."""


import pytest
import torch

from ..conftest import GRAM_METHODS, no_host_sync


@pytest.mark.cuda
@pytest.mark.parametrize("cls", GRAM_METHODS, ids=lambda c: c.__name__)
def test_gram_method_weights_without_host_sync(cls):
    try:
        method = cls(on_nonfinite="skip").cuda()
    except TypeError as exc:
        pytest.skip(f"{cls.__name__} needs constructor arguments: {exc}")
    A = torch.randn(8, 40, device="cuda")
    K = A @ A.T
    method.weights(K)  # first call may build state
    with no_host_sync():
        w = method.weights(K)
    assert w.device.type == "cuda" and w.shape[-1] == 8
    assert torch.isfinite(w).all()
