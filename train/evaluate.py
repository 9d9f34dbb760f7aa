"""`dextra evaluate`: sample images for seed test captions with the fine-tuned EMA model and score them.

- CLIP-FD: Fréchet distance between CLIP image features of the generated images and of the real test images
  (torchmetrics' FrechetInceptionDistance with CLIP as the feature network; no Inception weights are needed,
  which is what the demo has to live without). Features are L2-normalised, so values are small (0 = same
  distribution) and not comparable with the paper's Inception FIDs.
- CLIP score and GT CLIP score: the same score for the generated images and for the real test images (at the
  generated resolution) against the same captions; GT is the ceiling the CLIP model allows.
"""
from __future__ import annotations

import textwrap
from typing import Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler
from dvclive import Live
from PIL import Image, ImageDraw, ImageFont
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from tqdm import tqdm

from dextra.filter.clip import ClipBundle, load_clip
from dextra.pipeline.atomic import write_json
from dextra.pipeline.device import pick_device
from dextra.pipeline.errors import InputError
from dextra.pipeline.params import Params
from dextra.pipeline.paths import Paths

from .data import ConditionedImages, load_seed
from .model import Denoiser
from .sampling import sample

GRID_SAMPLES = 32
GRID_COLUMNS = 8


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


def pick_captions(data: ConditionedImages, num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(image index, condition row) per sample: test images in order, cycling when there are fewer than
    num_samples, each with a seeded random caption that moves on to the image's next caption every cycle."""
    count = data.count.numpy()
    image = np.arange(num_samples) % len(count)
    offset = np.random.default_rng(seed).integers(0, 1 << 30, len(count))
    rows = data.first.numpy()[image] + (offset[image] + np.arange(num_samples) // len(count)) % count[image]
    return image, rows


def caption_grid(images: torch.Tensor, captions: Sequence[str], cell: int = 128) -> Image.Image:
    """Samples upscaled (nearest, so pixels stay honest) in a grid with each caption written under its image."""
    font = ImageFont.load_default()
    line_height = int(font.getbbox("Ag")[3]) + 2
    chars = max(8, int(cell / font.getlength("n")))
    rows = -(-len(images) // GRID_COLUMNS)
    grid = Image.new("RGB", (GRID_COLUMNS * cell, rows * (cell + 3 * line_height)), "white")
    draw = ImageDraw.Draw(grid)
    pixels = (images * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    for i, (array, caption) in enumerate(zip(pixels, captions)):
        x, y = (i % GRID_COLUMNS) * cell, (i // GRID_COLUMNS) * (cell + 3 * line_height)
        grid.paste(Image.fromarray(array).resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        for j, line in enumerate(textwrap.wrap(caption, chars)[:3]):
            draw.text((x + 2, y + cell + j * line_height), line, fill="black", font=font)
    return grid


def run(params: Params, paths: Paths) -> dict:
    cfg = params.evaluate
    device = pick_device(params.device)
    folder = paths.model("finetune")
    model = Denoiser.load(folder).to(device).eval()
    scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    test, captions = load_seed(paths, "test", model.resolution)
    if len(test.images) < 2:
        raise InputError(f"{paths.seed_split('test')}: the Fréchet distance needs at least 2 test images, found {len(test.images)}")
    if test.conditions.shape[1] != model.condition_dim:
        raise InputError(
            f"{paths.embedding_file('seed_captions', 'test')}: caption embeddings have {test.conditions.shape[1]} dimensions, "
            f"the model in {folder} was conditioned on {model.condition_dim}"
        )
    bundle = load_clip(paths.clip, device)

    image_index, rows = pick_captions(test, cfg.num_samples, params.seed)
    texts = [captions[r] for r in rows]
    generator = torch.Generator().manual_seed(params.seed)
    conditions = test.conditions[torch.from_numpy(rows)].to(device)
    generated = torch.cat(
        [
            sample(model, scheduler, chunk, cfg.sampling_steps, cfg.guidance_scale, generator).cpu()
            for chunk in tqdm(conditions.split(cfg.batch_size), desc="evaluate", unit="batch")
        ]
    )
    real = test.images.float() / 255
    metrics = {
        "clip_fd": clip_fd(bundle, real, generated, cfg.batch_size),
        "clip_score": clip_score(bundle, generated, texts, cfg.batch_size),
        "gt_clip_score": clip_score(bundle, real[torch.from_numpy(image_index)], texts, cfg.batch_size),
    }
    with Live(dir=str(paths.live("evaluate")), save_dvc_exp=False, dvcyaml=None) as live:
        for name, value in metrics.items():
            live.log_metric(name, value, plot=False)
        live.log_image("samples.png", caption_grid(generated[:GRID_SAMPLES], texts[:GRID_SAMPLES]))
    summary = {**{k: round(v, 5) for k, v in metrics.items()}, "num_samples": cfg.num_samples, "guidance_scale": cfg.guidance_scale}
    write_json(paths.metrics / "eval.json", summary)
    return summary
