"""`dextra evaluate`: sample images for seed test captions with the fine-tuned EMA model and score them
(train/metrics.py): CLIP-FD, Inception FID when evaluate.inception_weights names a local file, CLIP score, and
the GT CLIP score of the real test images at the generated resolution, the ceiling the CLIP model allows.

With evaluate.baseline the seed-only model of the `baseline` stage is sampled for the same captions from the same
noise and scored beside it: the paper's claim, that pretraining on the extrapolated extra set helps, measured on
this run's data. metrics/eval.json holds both and their difference (pretrain→finetune minus seed-only).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler
from tqdm import tqdm

from dextra.filter.clip import ClipBundle, load_clip
from dextra.pipeline.atomic import write_json
from dextra.pipeline.device import pick_device
from dextra.pipeline.errors import InputError
from dextra.pipeline.params import EvaluateParams, Params
from dextra.pipeline.paths import Paths
from dextra.train.metrics import Frechet, TestPrompts, clip_frechet, clip_score, inception_frechet
from dextra.train.model import Denoiser, image_resolution, saved_vae
from dextra.train.sampling import image_grid, sample, sampler
from dvclive import Live

GRID_SAMPLES = 32
SEED_ONLY = "seed_only"


def load_model(folder: Path, device: torch.device) -> tuple[Denoiser, object, int]:
    """A saved EMA model with its VAE (or None) and the resolution of the images it generates."""
    model = Denoiser.load(folder).to(device).eval()
    vae = saved_vae(folder)
    if vae is not None:
        vae.to(device)
    return model, vae, image_resolution(model, vae)


def generate(
    model: Denoiser, vae, folder: Path, prompts: TestPrompts, cfg: EvaluateParams, seed: int, label: str
) -> torch.Tensor:
    if prompts.conditions.shape[1] != model.condition_size:
        raise InputError(
            f"{folder}: the model was conditioned on {model.condition_size} values, the seed test captions have {prompts.conditions.shape[1]}"
        )
    scheduler = sampler(cfg.sampler, DDPMScheduler.from_pretrained(folder / "scheduler").config)
    generator = torch.Generator().manual_seed(seed)  # the same noise for every model compared
    device = next(model.parameters()).device
    return torch.cat(
        [
            sample(model, scheduler, chunk.to(device), cfg.sampling_steps, cfg.guidance_scale, generator, vae).cpu()
            for chunk in tqdm(prompts.conditions.split(cfg.batch_size), desc=f"evaluate {label}", unit="batch")
        ]
    )


def score(
    distances: dict[str, Frechet], bundle: ClipBundle, prompts: TestPrompts, generated: torch.Tensor, batch_size: int
) -> dict[str, float]:
    return {
        **{name: distance(generated) for name, distance in distances.items()},
        "clip_score": clip_score(bundle, generated, prompts.captions, batch_size),
    }


def inception_weights(params: Params, paths: Paths) -> Path | None:
    name = params.evaluate.inception_weights
    if name is None:
        return None
    path = paths.root / name
    if not path.is_file():
        raise InputError(
            f"evaluate.inception_weights: {path} is not a file (torch-fidelity's Inception-v3 weights, e.g. weights-inception-2015-12-05-6726825d.pth)"
        )
    return path


def run(params: Params, paths: Paths) -> dict:
    cfg = params.evaluate
    device = pick_device(params.device)
    inception = inception_weights(params, paths)
    folders = {"main": paths.model("finetune")}
    if cfg.baseline:
        folders[SEED_ONLY] = paths.model("baseline")
        if not (folders[SEED_ONLY] / "scheduler").is_dir():
            raise InputError(
                f"{folders[SEED_ONLY]}: no seed-only model (evaluate.baseline is true: run `dextra baseline` first)"
            )
    models = {label: load_model(folder, device) for label, folder in folders.items()}  # each loaded once
    main_model, _, resolution = models["main"]
    prompts = TestPrompts.load(paths, main_model.mode, resolution, cfg.num_samples, params.seed)
    bundle = load_clip(paths.clip, device)
    distances = {"clip_fd": clip_frechet(bundle, prompts.real, cfg.batch_size)}
    if inception is not None:
        distances["fid"] = inception_frechet(inception, prompts.real, cfg.batch_size, device)

    scores, grids = {}, {}
    for label, folder in folders.items():
        model, vae, _ = models[label]
        generated = generate(model, vae, folder, prompts, cfg, params.seed, label)
        scores[label] = score(distances, bundle, prompts, generated, cfg.batch_size)
        grids[label] = image_grid(generated[:GRID_SAMPLES], prompts.captions[:GRID_SAMPLES])
    main = scores["main"]
    summary = {
        **main,
        "gt_clip_score": clip_score(bundle, prompts.real[prompts.image_index], prompts.captions, cfg.batch_size),
    }
    if SEED_ONLY in scores:
        summary[SEED_ONLY] = scores[SEED_ONLY]
        summary["difference"] = {name: main[name] - value for name, value in scores[SEED_ONLY].items()}

    with Live(dir=str(paths.live("evaluate")), save_dvc_exp=False, dvcyaml=None) as live:
        for name, value in summary.items():
            if not isinstance(value, dict):
                live.log_metric(name, value, plot=False)
        for label, grid in grids.items():
            live.log_image("samples.png" if label == "main" else f"samples_{label}.png", grid)
    summary = _rounded(summary) | {"num_samples": cfg.num_samples, "guidance_scale": cfg.guidance_scale}
    write_json(paths.metrics / "eval.json", summary)
    return summary


def _rounded(values: dict) -> dict:
    return {k: _rounded(v) if isinstance(v, dict) else round(v, 5) for k, v in values.items()}
