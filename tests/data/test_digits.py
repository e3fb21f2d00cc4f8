import pytest
import torch

from mtlfast.data import load, multi_digits, split_indices

pytest.importorskip("sklearn", reason="MultiDigits needs scikit-learn (the data extra)")


@pytest.fixture(scope="module")
def data():
    return multi_digits(n_train=600, n_val=100, n_test=200, seed=0)


def test_shapes_and_ranges(data):
    assert [t.name for t in data.tasks] == ["left", "right", "sum_parity", "larger"]
    assert data.input_shape == (1, 10, 14)
    assert (len(data.train), len(data.val), len(data.test)) == (600, 100, 200)
    assert data.train.x.min() >= 0 and data.train.x.max() <= 1
    for split in (data.train, data.val, data.test):
        for task in data.tasks:
            y = split.y[task.name]
            assert y.dtype == torch.int64 and y.min() >= 0 and y.max() < task.classes


def test_labels_are_consistent(data):
    y = data.test.y
    assert torch.equal(y["sum_parity"], (y["left"] + y["right"]) % 2)
    assert torch.equal(y["larger"] == 1, y["left"] == y["right"])
    assert torch.equal(y["larger"] == 0, y["left"] > y["right"])
    # All four classes of the digit tasks occur: the data set is not degenerate.
    assert len(y["left"].unique()) == 10 and len(y["larger"].unique()) == 3


def test_source_scans_disjoint_between_splits(data):
    pools = [set(s.source.flatten().tolist()) for s in (data.train, data.val, data.test)]
    assert not pools[0] & pools[1] and not pools[0] & pools[2] and not pools[1] & pools[2]


def test_deterministic_and_seeded(data):
    again = load("digits", n_train=600, n_val=100, n_test=200, seed=0)
    assert torch.equal(again.test.x, data.test.x)
    other = multi_digits(n_train=600, n_val=100, n_test=200, seed=1)
    assert not torch.equal(other.test.x, data.test.x)


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_train"):
        multi_digits(n_train=0)
    with pytest.raises(ValueError, match="data set name"):
        load("cifar")


def test_split_indices_partition():
    parts = split_indices(103, (0.8, 0.1, 0.1), seed=3)
    assert sorted(torch.cat(parts).tolist()) == list(range(103))
    assert [len(p) for p in parts] == [83, 10, 10]
    with pytest.raises(ValueError, match="fractions"):
        split_indices(10, (0.5, 0.5, 0.5), seed=0)
