"""Helpers shared by the test modules (no test module imports another)."""

from __future__ import annotations

from pathlib import Path

import yaml

from dextra.pipeline.params import merged

REPO = Path(__file__).resolve().parents[2]


# The demo's CLIP corpus at test scale: the full one is thousands of drawn images and minutes of training.
TEST_SCALE = {"demo": {"n_corpus": 90}, "clip": {"corpus_epochs": 1}}


def repo_params_dict(**overrides) -> dict:
    """The repository's params.yaml at TEST_SCALE as a dict, deep-merged with nested overrides (the one way tests
    build params)."""
    return merged(merged(yaml.safe_load((REPO / "params.yaml").read_text()), TEST_SCALE), overrides)


def repo_params(**overrides):
    from dextra.pipeline.params import parse_params

    return parse_params(repo_params_dict(**overrides))
