"""`dextra pretrain`: train the text-conditional diffusion model on the curated extra set, conditioned on the
extrapolated text embeddings (docs/architecture.md, "The method"), from scratch or, with pretrain.warm_start, from the
last pretrain's EMA weights (new extra data need not cost a full run)."""

from __future__ import annotations

from dextra.pipeline.params import Params
from dextra.pipeline.paths import Paths
from dextra.train.data import load_extra
from dextra.train.trainer import fresh_model, make_accelerator, train


def run(params: Params, paths: Paths) -> dict:
    accelerator = make_accelerator(params)
    model, data, vae = fresh_model(params, paths, accelerator, lambda encoding: load_extra(paths, encoding))
    return train(
        accelerator,
        model,
        data,
        params.pretrain,
        params,
        paths,
        "pretrain",
        vae=vae,
        warm_start=params.pretrain.warm_start,
    )
