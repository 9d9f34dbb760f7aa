"""`dextra evaluate`: sample images for seed test captions with the fine-tuned EMA model and score them.

- CLIP-FD: Fréchet distance between CLIP image features of the generated images and of the real test images
  (torchmetrics' FrechetInceptionDistance with CLIP as the feature network; no Inception weights are needed,
  which is what the demo has to live without). Features are L2-normalised, so values are small (0 = same
  distribution) and not comparable with the paper's Inception FIDs.
- CLIP score and GT CLIP score: the same score for the generated images and for the real test images (at the
  generated resolution) against the same captions; GT is the ceiling the CLIP model allows.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from diffusers import DDPMScheduler
from dvclive import Live
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from tqdm import tqdm

from dextra.filter.clip import ClipBundle, load_clip
from dextra.pipeline.atomic import write_json
from dextra.pipeline.device import pick_device
from dextra.pipeline.errors import InputError
from dextra.pipeline.params import Params
from dextra.pipeline.paths import Paths

from .data import Encoding, TrainingSet, load_seed
from .model import Denoiser, saved_vae, vae_downscale
from .sampling import image_grid, sample, sampler

GRID_SAMPLES = 32


class ClipFeatures(nn.Module):
    """CLIP image features as torchmetrics' `feature=` network; with normalize=True it gets floats in [0, 1]."""

    def __init__(self, bundle: ClipBundle):
        super().__init__()
        self.bundle = bundle  # a plain attribute: the CLIP weights stay out of the metric's state
        self.num_features = bundle.embed_dim

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.bundle.encode_pixels(pixels)


def clip_fd(bundle: ClipBundle, real: torch.Tensor, generated: torch.Tensor, batch_size: int) -> float:
    metric = FrechetInceptionDistance(feature=ClipFeatures(bundle), normalize=True).to(bundle.device)
    for images, is_real in ((real, True), (generated, False)):
        for chunk in images.split(batch_size):
            metric.update(chunk.to(bundle.device), real=is_real)
    return float(metric.compute())


def clip_score(bundle: ClipBundle, images: torch.Tensor, captions: Sequence[str], batch_size: int) -> float:
    """100 × mean over pairs of max(cos(image, caption), 0): torchmetrics' CLIPScore convention (its own class
    only takes Hugging Face CLIP models, not our open_clip one)."""
    texts = torch.from_numpy(bundle.encode_texts(list(captions)))
    pixels = torch.cat([bundle.encode_pixels(chunk).float().cpu() for chunk in images.split(batch_size)])
    return float(100 * (pixels * texts).sum(-1).clamp(min=0).mean())


def pick_captions(data: TrainingSet, num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(image index, condition row) per sample: test images in order, cycling when there are fewer than
    num_samples, each with a seeded random caption that moves on to the image's next caption every cycle."""
    count = data.count
    image = np.arange(num_samples) % len(count)
    offset = np.random.default_rng(seed).integers(0, 1 << 30, len(count))
    rows = data.first[image] + (offset[image] + np.arange(num_samples) // len(count)) % count[image]
    return image, rows


def run(params: Params, paths: Paths) -> dict:
    cfg = params.evaluate
    device = pick_device(params.device)
    folder = paths.model("finetune")
    model = Denoiser.load(folder).to(device).eval()
    vae = saved_vae(folder)
    if vae is not None:
        vae.to(device)
    scheduler = sampler(cfg.sampler, DDPMScheduler.from_pretrained(folder / "scheduler").config)
    # Sampling is conditioned on captions: an `image` model takes the caption's text embedding for the image's.
    mode = "tokens" if model.mode == "tokens" else "pooled"
    resolution = model.sample_size * (vae_downscale(vae) if vae else 1)
    test, captions = load_seed(paths, "test", Encoding.create(paths, resolution, mode))
    if len(test) < 2:
        raise InputError(f"{paths.seed_split('test')}: the Fréchet distance needs at least 2 test images, found {len(test)}")
    if test.condition_size != model.condition_size:
        raise InputError(
            f"{paths.embedding_file('seed_captions', 'test')}: conditions have {test.condition_size} values, "
            f"the model in {folder} was conditioned on {model.condition_size}"
        )
    bundle = load_clip(paths.clip, device)

    image_index, rows = pick_captions(test, cfg.num_samples, params.seed)
    texts = [captions[r] for r in rows]
    generator = torch.Generator().manual_seed(params.seed)
    conditions = test.condition_rows(rows).to(device)
    generated = torch.cat(
        [
            sample(model, scheduler, chunk, cfg.sampling_steps, cfg.guidance_scale, generator, vae).cpu()
            for chunk in tqdm(conditions.split(cfg.batch_size), desc="evaluate", unit="batch")
        ]
    )
    real = test.pixels()
    metrics = {
        "clip_fd": clip_fd(bundle, real, generated, cfg.batch_size),
        "clip_score": clip_score(bundle, generated, texts, cfg.batch_size),
        "gt_clip_score": clip_score(bundle, real[torch.from_numpy(image_index)], texts, cfg.batch_size),
    }
    with Live(dir=str(paths.live("evaluate")), save_dvc_exp=False, dvcyaml=None) as live:
        for name, value in metrics.items():
            live.log_metric(name, value, plot=False)
        live.log_image("samples.png", image_grid(generated[:GRID_SAMPLES], texts[:GRID_SAMPLES]))
    summary = {**{k: round(v, 5) for k, v in metrics.items()}, "num_samples": cfg.num_samples, "guidance_scale": cfg.guidance_scale}
    write_json(paths.metrics / "eval.json", summary)
    return summary
