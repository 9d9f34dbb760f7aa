"""Sampling with the paper's NULL guidance (docs/architecture.md, "The method"): DDIM or DPM-Solver, in pixel or
latent space."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.configuration_utils import FrozenDict
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from dextra.pipeline.device import autocast
from dextra.pipeline.errors import InputError
from dextra.pipeline.params import EvaluateParams
from dextra.train.model import Denoiser, image_resolution, saved_vae

SAMPLERS = {"ddim": DDIMScheduler, "dpm_solver": DPMSolverMultistepScheduler}
GRID_COLUMNS = 8


def sampler(name: str, training_config: FrozenDict) -> DDIMScheduler | DPMSolverMultistepScheduler:
    """A sampler carrying the training noise schedule and prediction type (the saved DDPMScheduler's config)."""
    return SAMPLERS[name].from_config(training_config)


def null_guidance(
    model: Denoiser, sample: torch.Tensor, timestep: torch.Tensor, condition: torch.Tensor, scale: float
) -> torch.Tensor:
    """out_null + η (out_cond − out_null): η = 0 is the unconditional model, η = 1 the conditional one, η > 1
    pushes past it. For a v-prediction model this is exactly the paper's ε formula, because at a fixed noisy
    sample v and ε are related by the same affine map for both halves. The conditional and NULL halves run as
    one batch, one forward per step."""
    null = torch.arange(2 * len(sample), device=sample.device) >= len(sample)
    out_cond, out_null = model(torch.cat([sample, sample]), timestep, torch.cat([condition, condition]), null).chunk(2)
    return out_null + scale * (out_cond - out_null)


@torch.no_grad()
def sample(
    model: Denoiser,
    scheduler: DDIMScheduler | DPMSolverMultistepScheduler,
    condition: torch.Tensor,
    steps: int,
    scale: float,
    generator: torch.Generator,
    vae: AutoencoderKL | None = None,
) -> torch.Tensor:
    """Images in [0, 1], (N, 3, H, W), one per condition row (embeddings, or token ids for a `tokens` model). Noise
    comes from a CPU generator, so a seed gives the same start on any device; a latent model's samples are decoded."""
    device = condition.device
    x = torch.randn(len(condition), model.channels, model.sample_size, model.sample_size, generator=generator).to(
        device
    )
    scheduler.set_timesteps(steps, device=device)
    x = x * scheduler.init_noise_sigma
    for timestep in scheduler.timesteps:
        x = scheduler.step(
            null_guidance(model, scheduler.scale_model_input(x, timestep), timestep, condition, scale), timestep, x
        ).prev_sample
    if vae is not None:
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        x = vae.decode((x / vae.config.scaling_factor + shift).to(vae.dtype)).sample.float()
    return ((x + 1) / 2).clamp(0, 1)


def load_model(folder: Path, device: torch.device) -> tuple[Denoiser, object, int]:
    """A saved EMA model with its VAE (or None) and the resolution of the images it generates."""
    model = Denoiser.load(folder).to(device).eval()
    vae = saved_vae(folder)
    if vae is not None:
        vae.to(device)
    return model, vae, image_resolution(model, vae)


def generate(
    model: Denoiser, vae, folder: Path, conditions: torch.Tensor, cfg: EvaluateParams, seed: int, label: str
) -> torch.Tensor:
    """Samples for each condition row, `cfg.batch_size` at a time with the sampler the params name, from a noise
    seeded by `seed`: every model compared gets the same noise."""
    if conditions.shape[1] != model.condition_size:
        raise InputError(
            f"{folder}: the model was conditioned on {model.condition_size} values, "
            f"the prompts have {conditions.shape[1]}"
        )
    scheduler = sampler(cfg.sampler, DDPMScheduler.from_pretrained(folder / "scheduler").config)
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    with autocast(device):
        return torch.cat(
            [
                sample(model, scheduler, chunk.to(device), cfg.sampling_steps, cfg.guidance_scale, generator, vae)
                .float()
                .cpu()
                for chunk in tqdm(conditions.split(cfg.batch_size), desc=f"evaluate {label}", unit="batch")
            ]
        )


def image_grid(images: torch.Tensor, captions: Sequence[str] | None = None, cell: int = 128) -> Image.Image:
    """Samples upscaled (nearest, so pixels stay honest) in a grid, with each caption written under its image."""
    font = ImageFont.load_default()
    line_height = int(font.getbbox("Ag")[3]) + 2
    chars = max(8, int(cell / font.getlength("n")))
    text_height = 3 * line_height if captions else 0
    rows = -(-len(images) // GRID_COLUMNS)
    grid = Image.new("RGB", (GRID_COLUMNS * cell, rows * (cell + text_height)), "white")
    draw = ImageDraw.Draw(grid)
    pixels = (images * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    for i, array in enumerate(pixels):
        x, y = (i % GRID_COLUMNS) * cell, (i // GRID_COLUMNS) * (cell + text_height)
        grid.paste(Image.fromarray(array).resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        for j, line in enumerate(textwrap.wrap(captions[i], chars)[:3] if captions else []):
            draw.text((x + 2, y + cell + j * line_height), line, fill="black", font=font)
    return grid
