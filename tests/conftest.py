"""Shared fixtures: params built from the repository's params.yaml with small overrides, and tiny images."""

from __future__ import annotations

import copy
import io
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO = Path(__file__).resolve().parents[1]


def _merge(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def repo_params_dict(**overrides) -> dict:
    """The repository's params.yaml as a dict, merged with nested overrides."""
    return _merge(yaml.safe_load((REPO / "params.yaml").read_text()), overrides)


@pytest.fixture
def params_dict():
    return repo_params_dict


@pytest.fixture
def make_params(params_dict):
    from dextra.pipeline.params import parse_params

    return lambda **overrides: parse_params(params_dict(**overrides))


def encode_png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def png():
    """png(rgb, size=16) -> bytes of a solid-colour PNG."""
    return lambda rgb, size=16: encode_png(np.broadcast_to(np.array(rgb, np.uint8), (size, size, 3)))
