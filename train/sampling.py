"""DDIM sampling with the paper's NULL guidance (DESIGN.md "The method" 5)."""
from __future__ import annotations

import torch
from diffusers import DDIMScheduler

from .model import Denoiser


def null_guidance(model: Denoiser, sample: torch.Tensor, timestep: torch.Tensor, condition: torch.Tensor, scale: float) -> torch.Tensor:
    """out_null + η (out_cond − out_null): η = 0 is the unconditional model, η = 1 the conditional one, η > 1
    pushes past it. For a v-prediction model this is exactly the paper's ε formula, because at a fixed noisy
    sample v and ε are related by the same affine map for both halves. The conditional and NULL halves run as
    one batch, one forward per step."""
    null = torch.arange(2 * len(sample), device=sample.device) >= len(sample)
    out_cond, out_null = model(torch.cat([sample, sample]), timestep, torch.cat([condition, condition]), null).chunk(2)
    return out_null + scale * (out_cond - out_null)


@torch.no_grad()
def sample(model: Denoiser, scheduler: DDIMScheduler, condition: torch.Tensor, steps: int, scale: float, generator: torch.Generator) -> torch.Tensor:
    """Images in [0, 1], (N, 3, R, R), one per condition row. `scheduler` carries the training noise schedule
    and prediction type. Noise comes from a CPU generator, so a seed gives the same start on any device."""
    device = condition.device
    resolution = model.resolution
    images = torch.randn(len(condition), 3, resolution, resolution, generator=generator).to(device)
    scheduler.set_timesteps(steps, device=device)
    for timestep in scheduler.timesteps:
        images = scheduler.step(null_guidance(model, images, timestep, condition, scale), timestep, images).prev_sample
    return ((images + 1) / 2).clamp(0, 1)
