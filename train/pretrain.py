"""`dextra pretrain`: train the text-conditional diffusion model from scratch on the curated extra set,
conditioned on the extrapolated text embeddings (DESIGN.md "The method" 4)."""
from __future__ import annotations

from accelerate.utils import set_seed

from dextra.pipeline.params import Params
from dextra.pipeline.paths import Paths

from .data import load_curated
from .model import build_denoiser
from .trainer import train


def run(params: Params, paths: Paths) -> dict:
    data = load_curated(paths, params.train.resolution)
    set_seed(params.seed)
    model = build_denoiser(params.train, condition_dim=data.conditions.shape[1])
    return train(model, data, params.pretrain, params, paths, "pretrain")
