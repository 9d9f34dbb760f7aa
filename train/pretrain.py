"""`dextra pretrain`: train the text-conditional diffusion model on the curated extra set, conditioned on the
extrapolated text embeddings (DESIGN.md "The method" 4), from scratch or, with pretrain.warm_start, from the last
pretrain's EMA weights (new extra data need not cost a full run)."""

from __future__ import annotations

from collections.abc import Callable

from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import AutoencoderKL

from dextra.pipeline.errors import ParamsError
from dextra.pipeline.params import Params
from dextra.pipeline.paths import Paths
from dextra.train.data import Encoding, TrainingSet, load_extra
from dextra.train.model import Denoiser, build_condition, build_denoiser, load_vae, vae_downscale
from dextra.train.trainer import make_accelerator, train


def fresh_model(
    params: Params, paths: Paths, accelerator: Accelerator, load: Callable[[Encoding], TrainingSet]
) -> tuple[Denoiser, TrainingSet, AutoencoderKL | None]:
    """A new model as params.train describes it, with the data `load` reads in that model's encoding (also the
    seed-only baseline's start)."""
    cfg = params.train
    vae = load_vae(cfg.vae) if cfg.vae else None
    downscale = vae_downscale(vae) if vae else 1
    if cfg.resolution % downscale:
        raise ParamsError(
            f"train.resolution: {cfg.resolution} is not a multiple of the VAE's downscale factor {downscale} (train.vae)"
        )
    encoding = Encoding.create(paths, cfg.resolution, cfg.conditioning, vae, cfg.random_flip, accelerator.device)
    with accelerator.local_main_process_first():  # one process per machine decodes; the others read its cache
        data = load(encoding)
    set_seed(params.seed)
    condition = build_condition(cfg, data.condition_size, paths.clip)
    return (
        build_denoiser(cfg, condition, vae.config.latent_channels if vae else 3, cfg.resolution // downscale),
        data,
        vae,
    )


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
