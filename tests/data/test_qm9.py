import importlib
import importlib.util

import pytest
import torch

from mtlfast.data import qm9

# The package re-exports the loader function under the module's name.
qm9_module = importlib.import_module("mtlfast.data.qm9")

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("qm9pack") is None or importlib.util.find_spec("pandas") is None,
    reason="QM9 needs qm9pack and pandas: pip install 'mtlfast[qm9]'",
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MTLFAST_CACHE", str(tmp_path_factory.mktemp("cache")))
        return qm9(limit=400, seed=0)


def test_shapes_targets_split(data):
    assert [t.name for t in data.tasks] == list(qm9_module.TARGETS)
    assert all(t.kind == "regression" and t.metric == "mae" for t in data.tasks)
    assert (len(data.train), len(data.val), len(data.test)) == (320, 40, 40)
    assert data.input_shape == (qm9_module.MAX_ATOMS + 5,)
    assert torch.isfinite(data.train.x).all()
    ids = [set(s.source.tolist()) for s in (data.train, data.val, data.test)]
    assert not ids[0] & ids[1] and not ids[0] & ids[2] and not ids[1] & ids[2]
    # Standardized with training statistics.
    for task in data.tasks:
        y = data.train.y[task.name]
        assert abs(y.mean()) < 1e-4 and abs(y.std() - 1) < 1e-3
        assert data.target_scale[task.name] > 0


def test_first_molecule_is_methane():
    frame = qm9_module._read(limit=3)
    x, targets = qm9_module._featurize(frame)
    # CH4: counts H=4, C=1; U0 = -40.47893 Ha (the CSV's first row); 5 non-zero eigenvalues.
    assert x[0, qm9_module.MAX_ATOMS :].tolist() == [4.0, 1.0, 0.0, 0.0, 0.0]
    assert targets[0, list(qm9_module.TARGETS).index("U0")].item() == pytest.approx(-40.47893)
    assert (x[0, :5].abs() > 1e-3).all() and (x[0, 5 : qm9_module.MAX_ATOMS] == 0).all()


def test_coulomb_eigenvalues_two_atoms_hand_computed():
    # H2 at 1.4 bohr: M = [[0.5, 1/1.4], [1/1.4, 0.5]], eigenvalues 0.5 +- 1/1.4.
    charges = torch.tensor([[1, 1, 0]])
    coords = torch.tensor([[[0.0, 0.0, 0.0], [1.4, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    eig = qm9_module.coulomb_eigenvalues(charges, coords)
    expected = torch.tensor([[0.5 + 1 / 1.4, 0.5 - 1 / 1.4, 0.0]])
    assert torch.allclose(eig, expected, atol=1e-6)


def test_bad_limit():
    with pytest.raises(ValueError, match="limit"):
        qm9(limit=3)
