"""QM9: 130,831 real small molecules, 11 regression targets (the Nash-MTL/FAMO benchmark).

Data: the PyPI package ``qm9pack`` (MIT; the ``qm9`` extra), whose CSVs are read directly:
``import qm9pack`` needs ``pkg_resources``, gone from setuptools >= 81, so the package folder
is found with :func:`importlib.util.find_spec` instead. Targets are the 11 of Navon et al.
2022 (mu, alpha, homo, lumo, r2, zpve, U0, U, H, G, cv), in the CSV's units (Debye, bohr^3,
Hartree, bohr^2, cal/mol/K); the energies are totals, not atomization energies.
Features (fixed, no graph network): the 29 eigenvalues of the Coulomb matrix (Rupp et al.
2012, M_ii = Z_i^2.4 / 2, M_ij = Z_i Z_j / |R_i - R_j| in bohr), sorted by magnitude and
zero-padded, plus the counts of H, C, N, O, F; standardized with training statistics, as are
the targets. Split: a fixed-seed permutation, 10,000 validation and 10,000 test molecules,
the rest (110,831) training.
"""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import torch

from .base import MTLData, Split, Task, cache_dir, split_indices

# Task name -> qm9pack column.
TARGETS = {
    "mu": "Dipole_debye",
    "alpha": "Polarizability_bohr3",
    "homo": "HOMO_au",
    "lumo": "LUMO_au",
    "r2": "R2_bohr2",
    "zpve": "ZPVE_au",
    "U0": "InternalEnergy_0K_au",
    "U": "InternalEnergy_298K_au",
    "H": "Enthalphy_298K_au",
    "G": "GibbsFreeEnergy_298K_au",
    "cv": "Heatcapacity_Cv_cal_mol_K",
}
CHARGES = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}
MAX_ATOMS = 29
ANGSTROM_TO_BOHR = 1.0 / 0.529177210903
N_HELD_OUT = 10_000
_VERSION = 1


def data_folder() -> pathlib.Path:
    """qm9pack's CSV folder, located without importing the package."""
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("QM9 needs the qm9pack package: pip install 'mtlfast[qm9]'")
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / "data"


def _read(limit: int | None):
    import pandas as pd

    columns = ["Elements", "XYZ_Ang", *TARGETS.values()]
    frames, remaining = [], limit
    for part in ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv"):
        frames.append(pd.read_csv(data_folder() / part, usecols=columns, nrows=remaining))
        if remaining is not None:
            remaining -= len(frames[-1])
            if remaining <= 0:
                break
    return pd.concat(frames, ignore_index=True)


def coulomb_eigenvalues(charges: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """(N, A) nuclear charges (0 = padding), (N, A, 3) bohr -> (N, A) eigenvalues by |.| desc."""
    z = charges.to(torch.float64)
    dist = torch.cdist(coords.to(torch.float64), coords.to(torch.float64))
    eye = torch.eye(charges.shape[1], dtype=torch.bool)
    off = z[:, :, None] * z[:, None, :] / torch.where(eye, 1.0, dist).clamp_min(1e-8)
    matrix = torch.where(eye, 0.5 * z[:, :, None] ** 2.4, off)
    eig = torch.linalg.eigvalsh(matrix)
    order = eig.abs().argsort(dim=1, descending=True)
    return eig.gather(1, order).float()


def _featurize(frame) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(frame)
    charges = torch.zeros(n, MAX_ATOMS, dtype=torch.int64)
    coords = torch.zeros(n, MAX_ATOMS, 3, dtype=torch.float64)
    for i, (elements, xyz) in enumerate(zip(frame["Elements"], frame["XYZ_Ang"], strict=True)):
        symbols = elements.strip("[]").replace("'", "").split(",")
        # Not valid JSON in a few rows ("0."): strip brackets and split on commas.
        values = np.array(xyz.replace("[", "").replace("]", "").split(","), dtype=np.float64)
        charges[i, : len(symbols)] = torch.tensor([CHARGES[s.strip()] for s in symbols])
        coords[i, : len(symbols)] = torch.from_numpy(values.reshape(-1, 3))
    coords *= ANGSTROM_TO_BOHR
    eig = torch.cat(
        [coulomb_eigenvalues(c, r) for c, r in zip(charges.split(8192), coords.split(8192),
                                                  strict=True)]
    )
    counts = torch.stack([(charges == z).sum(1) for z in CHARGES.values()], dim=1).float()
    targets = torch.from_numpy(frame[list(TARGETS.values())].to_numpy(dtype=np.float64))
    return torch.cat([eig, counts], dim=1), targets


def qm9(limit: int | None = None, seed: int = 0) -> MTLData:
    """Build (or load from cache) QM9 with Coulomb-matrix features and 11 targets.

    ``limit`` keeps the first ``limit`` molecules (for tests; split 80/10/10 then);
    the full set uses the 110,831 / 10,000 / 10,000 split. MAE on the standardized targets
    times ``target_scale[task]`` is the MAE in the CSV's units.
    """
    if limit is not None and (not isinstance(limit, int) or limit < 10):
        raise ValueError(f"limit must be None or an int >= 10, got {limit!r}")
    path = cache_dir() / f"qm9_v{_VERSION}_{limit or 'all'}.pt"
    if path.exists():
        x, targets = torch.load(path)
    else:
        x, targets = _featurize(_read(limit))
        tmp = path.with_suffix(".tmp")
        torch.save((x, targets), tmp)
        tmp.replace(path)
    n = x.shape[0]
    fractions = (0.8, 0.1, 0.1) if limit is not None else (
        1 - 2 * N_HELD_OUT / n, N_HELD_OUT / n, N_HELD_OUT / n)
    parts = split_indices(n, fractions, seed)
    train = parts[0]
    x_mean, x_std = x[train].mean(0), x[train].std(0).clamp_min(1e-6)
    t_mean, t_std = targets[train].mean(0), targets[train].std(0).clamp_min(1e-12)
    xs = (x - x_mean) / x_std
    ts = ((targets - t_mean) / t_std).float()
    names = list(TARGETS)
    train_s, val_s, test_s = (
        Split(xs[idx], {name: ts[idx, j] for j, name in enumerate(names)}, source=idx)
        for idx in parts
    )
    return MTLData(
        name="qm9",
        tasks=[Task(name, "regression", 1) for name in names],
        train=train_s,
        val=val_s,
        test=test_s,
        target_scale={name: float(t_std[j]) for j, name in enumerate(names)},
        description="QM9 (qm9pack): Coulomb-matrix eigenvalues + atom counts; 11 targets",
    )
