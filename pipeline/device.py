"""Device choice: CUDA when present (or asked for), else CPU."""

from __future__ import annotations

import torch

from dextra.pipeline.errors import ParamsError


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ParamsError("device: 'cuda' was asked for but torch sees no CUDA device (use 'auto' or 'cpu')")
    if requested == "cpu":
        return torch.device("cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on a CUDA device that has it (weights stay fp32), off elsewhere: for the forward passes run
    outside accelerate (the prior, sampling), as the trainer's own run inside accelerator.autocast()."""
    enabled = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)
