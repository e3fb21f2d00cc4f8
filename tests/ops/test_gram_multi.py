import pytest
import torch

from mtlfast.ops import gram, gram_multi, gram_multi_reference, gram_reference
from tests.conftest import devices, rel_err


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("T", [1, 5, 32])
def test_equals_gram_of_concatenation(device, T):
    widths = [3, 1, 0, 1000, 77]
    Gs = [torch.randn(T, p, device=device) for p in widths]
    Gs[3] = torch.randn(T, 1010, device=device)[:, 5:1005]  # a strided slice
    K = gram_multi(Gs)
    assert K.shape == (T, T) and K.dtype == torch.float32
    assert rel_err(K, gram(torch.cat(Gs, dim=1))) < 1e-5
    assert rel_err(gram_multi_reference(Gs), gram_reference(torch.cat(Gs, 1).double())) < 1e-6


def test_float64_stays_float64_and_all_empty_is_zero():
    Gs = [torch.randn(4, 10, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)]
    K = gram_multi(Gs)
    assert K.dtype == torch.float64
    assert rel_err(K, gram_reference(torch.cat(Gs, 1))) < 1e-13
    assert torch.equal(gram_multi([torch.zeros(3, 0)]), torch.zeros(3, 3))


@pytest.mark.parametrize(
    "bad, err, what",
    [
        (torch.zeros(3, 4), TypeError, "list"),
        ([], ValueError, "at least one"),
        ([torch.zeros(3, 4), torch.zeros(2, 4)], ValueError, r"Gs\[1\]"),
        ([torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.float64)], ValueError, r"Gs\[1\]"),
        ([torch.zeros(3)], ValueError, r"Gs\[0\]"),
        ([torch.zeros(3, 2, dtype=torch.int32)], TypeError, r"Gs\[0\]"),
    ],
)
def test_bad_input_rejected(bad, err, what):
    with pytest.raises(err, match=what):
        gram_multi(bad)
