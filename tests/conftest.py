"""Shared fixtures: params built from the repository's params.yaml with small overrides, tiny images, and the
loopback guard every test runs under."""

from __future__ import annotations

import io
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import repo_params, repo_params_dict
from tests.helpers.dvc import SMALL_DEMO, project_copy, timed_repro
from tests.helpers.web import guard_loopback

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


@pytest.fixture
def params_dict():
    return repo_params_dict


@pytest.fixture
def make_params():
    return repo_params


@pytest.fixture(autouse=True, scope="session")
def loopback_only():
    """Every test runs under the guard that refuses any connection off loopback (tests/helpers/web.py)."""
    return guard_loopback()


def encode_png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def png():
    """png(rgb, size=16) -> bytes of a solid-colour PNG."""
    return lambda rgb, size=16: encode_png(np.broadcast_to(np.array(rgb, np.uint8), (size, size, 3)))


@dataclass
class SmallDemo:
    pristine: Path  # the project before any stage ran
    finished: Path  # a copy after one whole `dvc repro`: tests that change it work on a copy of their own
    output: str  # that repro's output
    seconds: dict[str, float]  # how long each stage took in it


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory) -> SmallDemo:
    """One whole `dvc repro` of the small demo, shared by the DVC-level tests (slow ones only)."""
    base = tmp_path_factory.mktemp("small_demo")
    pristine = project_copy(base / "pristine", repo_params_dict(**SMALL_DEMO))
    shutil.copytree(pristine, base / "finished", symlinks=True)
    output, seconds = timed_repro(base / "finished")
    return SmallDemo(pristine, base / "finished", output, seconds)
