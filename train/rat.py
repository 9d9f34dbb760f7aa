"""`train.backbone: rat`: a DiT whose text enters through a recurrent affine transformation (RAT).

The paper's backbone (RAT-Diffusion, arXiv 2410.01638, after RAT-GAN, arXiv 2204.10482) is a DiT whose blocks are
grouped: an LSTM cell reads the sentence embedding once per group, its state carries from one group to the next, and
each group's hidden state gives that group's scale and shift of the normalised tokens, on top of the timestep's
adaLN-Zero modulation. The recurrence lets the groups' text modulations depend on each other, which independent
per-block projections cannot. diffusers has no such model, so it is written here from those papers, out of diffusers'
parts (patch and timestep embeddings, attention, feed-forward) so that save_pretrained / from_pretrained, EMA and the
schedulers treat it as any other diffusers model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import PatchEmbed, TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

TIMESTEP_CHANNELS = 256


class RecurrentAffine(nn.Module):
    """One LSTM cell stepped once per block group on the sentence embedding; each group reads its (scale, shift)
    from its own step's hidden state."""

    def __init__(self, text_dim: int, hidden_dim: int, width: int, groups: int):
        super().__init__()
        self.cell = nn.LSTMCell(text_dim, hidden_dim)
        self.heads = nn.ModuleList(nn.Linear(hidden_dim, 2 * width) for _ in range(groups))

    def forward(self, text: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        state = None
        modulations = []
        for head in self.heads:
            state = self.cell(text, state)
            scale, shift = head(state[0]).unsqueeze(1).chunk(2, dim=-1)
            modulations.append((scale, shift))
        return modulations


class RATBlock(nn.Module):
    """A DiT block (self-attention, then an MLP, each residual and gated by the timestep) whose normalised tokens are
    also scaled and shifted by its group's text modulation."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(query_dim=width, heads=heads, dim_head=width // heads, bias=True, out_bias=True)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(width, mult=4, activation_fn="gelu-approximate")
        self.timestep_modulation = nn.Linear(width, 6 * width)
        nn.init.zeros_(self.timestep_modulation.weight)  # adaLN-Zero: each block starts as the identity
        nn.init.zeros_(self.timestep_modulation.bias)

    def forward(
        self, tokens: torch.Tensor, timestep: torch.Tensor, text: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = (
            self.timestep_modulation(F.silu(timestep)).unsqueeze(1).chunk(6, -1)
        )
        text_scale, text_shift = text
        hidden = self.norm1(tokens) * (1 + scale1 + text_scale) + shift1 + text_shift
        tokens = tokens + gate1 * self.attn(hidden)
        hidden = self.norm2(tokens) * (1 + scale2 + text_scale) + shift2 + text_shift
        return tokens + gate2 * self.ff(hidden)


class RATTransformer2DModel(ModelMixin, ConfigMixin):
    """Patches of `sample_size`² inputs, `num_groups` × `blocks_per_group` RAT blocks, and a timestep-modulated
    linear decoder back to `out_channels` per pixel. `text` is one embedding per image (`text_dim` wide)."""

    @register_to_config
    def __init__(
        self,
        sample_size: int = 16,
        patch_size: int = 2,
        in_channels: int = 3,
        out_channels: int = 3,
        width: int = 64,
        num_attention_heads: int = 4,
        num_groups: int = 2,
        blocks_per_group: int = 2,
        text_dim: int = 256,
        recurrent_dim: int = 128,
    ):
        super().__init__()
        self.patches = PatchEmbed(
            height=sample_size,
            width=sample_size,
            patch_size=patch_size,
            in_channels=in_channels,
            embed_dim=width,
            pos_embed_type="sincos",
        )
        self.timestep_proj = Timesteps(TIMESTEP_CHANNELS, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.timestep_embedding = TimestepEmbedding(TIMESTEP_CHANNELS, width)
        self.text_affine = RecurrentAffine(text_dim, recurrent_dim, width, num_groups)
        self.groups = nn.ModuleList(
            nn.ModuleList(RATBlock(width, num_attention_heads) for _ in range(blocks_per_group))
            for _ in range(num_groups)
        )
        self.norm_out = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.out_modulation = nn.Linear(width, 2 * width)
        self.proj_out = nn.Linear(width, patch_size * patch_size * out_channels)
        for layer in (self.out_modulation, self.proj_out):  # the DiT's zero-initialised final layer
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = sample.shape
        tokens = self.patches(sample)
        embedded = self.timestep_embedding(self.timestep_proj(timestep).to(tokens.dtype))
        for blocks, modulation in zip(self.groups, self.text_affine(text.to(tokens.dtype)), strict=True):
            for block in blocks:
                tokens = block(tokens, embedded, modulation)
        shift, scale = self.out_modulation(F.silu(embedded)).unsqueeze(1).chunk(2, dim=-1)
        tokens = self.proj_out(self.norm_out(tokens) * (1 + scale) + shift)
        p, channels = self.config.patch_size, self.config.out_channels
        tokens = tokens.reshape(batch, height // p, width // p, p, p, channels)
        return tokens.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, height, width)
