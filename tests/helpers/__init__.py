"""Helpers shared by the test modules (no test module imports another)."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def merge(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def repo_params_dict(**overrides) -> dict:
    """The repository's params.yaml as a dict, deep-merged with nested overrides (the one way tests build params)."""
    return merge(yaml.safe_load((REPO / "params.yaml").read_text()), overrides)


def repo_params(**overrides):
    from dextra.pipeline.params import parse_params

    return parse_params(repo_params_dict(**overrides))
