"""The denoiser: a pixel-space diffusers UNet conditioned on one pooled CLIP text embedding.

The paper conditions on a single sentence embedding (extrapolated for web images, DESIGN.md "The method" 3),
so a small projector turns that vector into a few cross-attention tokens, and holds the learned NULL condition
that classifier-free "NULL guidance" contrasts against. Both parts save with diffusers' save_pretrained into
one folder (unet/, condition/), so finetune and evaluate load a model without knowing the params it was built from.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from dextra.pipeline.errors import InputError
from dextra.pipeline.params import TrainParams


class ConditionProjector(ModelMixin, ConfigMixin):
    """Pooled embedding (B, d) -> (B, tokens, cross_attention_dim), or the NULL tokens where `null` is set.

    NULL is learned directly as tokens, so "no caption" never has to be expressed as some embedding vector."""

    @register_to_config
    def __init__(self, embed_dim: int, cross_attention_dim: int, tokens: int):
        super().__init__()
        self.proj = nn.Linear(embed_dim, tokens * cross_attention_dim)
        self.null = nn.Parameter(torch.randn(tokens, cross_attention_dim) * 0.02)

    def forward(self, condition: torch.Tensor, null: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.proj(condition).view(len(condition), self.config.tokens, self.config.cross_attention_dim)
        if null is None:
            return tokens
        return torch.where(null[:, None, None], self.null.to(tokens.dtype), tokens)


class Denoiser(nn.Module):
    """The UNet's prediction (ε or v, per train.prediction_type) given a condition vector; one module so DDP and EMA see all weights."""

    def __init__(self, unet: UNet2DConditionModel, condition: ConditionProjector):
        super().__init__()
        self.unet = unet
        self.condition = condition

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor, null: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(sample, timesteps, encoder_hidden_states=self.condition(condition, null)).sample

    @property
    def resolution(self) -> int:
        return int(self.unet.config.sample_size)

    @property
    def condition_dim(self) -> int:
        return int(self.condition.config.embed_dim)

    def save(self, folder: Path) -> None:
        self.unet.save_pretrained(folder / "unet")
        self.condition.save_pretrained(folder / "condition")

    @classmethod
    def load(cls, folder: Path) -> "Denoiser":
        for part in ("unet", "condition"):
            if not (folder / part / "config.json").exists():
                raise InputError(f"{folder}: no saved model ({part}/config.json missing); run `dextra {folder.name}` first")
        return cls(UNet2DConditionModel.from_pretrained(folder / "unet"), ConditionProjector.from_pretrained(folder / "condition"))


def build_denoiser(cfg: TrainParams, condition_dim: int) -> Denoiser:
    """A fresh model from params.train.unet; attention only below full resolution, where it is cheap."""
    channels = list(cfg.unet.block_out_channels)
    cross = len(channels) - 1 if len(channels) > 1 else 1
    down = ["DownBlock2D"] * (len(channels) - cross) + ["CrossAttnDownBlock2D"] * cross
    unet = UNet2DConditionModel(
        sample_size=cfg.resolution,
        in_channels=3,
        out_channels=3,
        block_out_channels=channels,
        layers_per_block=cfg.unet.layers_per_block,
        down_block_types=down,
        up_block_types=[name.replace("Down", "Up") for name in reversed(down)],
        cross_attention_dim=cfg.unet.cross_attention_dim,
        # diffusers reads `attention_head_dim` as the number of heads (its documented naming slip), so pass heads.
        attention_head_dim=tuple(max(1, c // cfg.unet.attention_head_dim) for c in channels),
        norm_num_groups=math.gcd(32, *channels),
    )
    return Denoiser(unet, ConditionProjector(condition_dim, cfg.unet.cross_attention_dim, cfg.unet.condition_tokens))
