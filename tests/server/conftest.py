"""A small calibrated index of real data, built once per session and copied for tests that change it."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from realdata import PIPED, piped_train
from simsearch import Engine


@pytest.fixture(scope="session")
def piped_index(tmp_path_factory) -> Path:
    """PIPED PA_BDP01_TL train/good with a quarter held out, calibrated; never modified (copy it to write)."""
    if not PIPED.is_dir():
        pytest.skip(f"real data not found at {PIPED}")
    directory = tmp_path_factory.mktemp("served") / "piped"
    with Engine.create(directory) as engine:
        engine.add([str(p) for p in piped_train()], holdout=0.25)
        engine.calibrate(target_fpr=0.01)
    return directory


@pytest.fixture
def writable_index(piped_index, tmp_path) -> Path:
    copy = tmp_path / "piped"
    shutil.copytree(piped_index, copy)
    return copy
