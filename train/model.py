"""The denoiser: a diffusers backbone (UNet2DConditionModel; a DiT, diffusers' PixArtTransformer2DModel; or the
paper's recurrent affine DiT, train/rat.py) and the conditioner that turns a condition into the tokens the backbone
reads.

Conditioning (train.conditioning):
- `pooled`, the paper's: one CLIP text embedding per image (a seed caption's, or the extrapolated one of a web image),
  projected to a few tokens.
- `image`: the CLIP image embedding instead, so uncaptioned crawl can train (language-free, as in LAFITE / Shifted
  Diffusion); CLIP puts text and images in one space, so at sampling a caption's text embedding takes its place.
- `tokens`: caption token ids through a text encoder, whose per-token states are projected: CLIP's text transformer
  copied from models/clip, or a transformers encoder named by train.text_encoder (train/text_encoder.py); frozen
  unless train.train_text_encoder.
Each holds the learned NULL condition that NULL guidance contrasts against. Everything saves with diffusers'
save_pretrained into one folder (unet/ or transformer/, condition/, and vae/ for latent models), so finetune and
evaluate load a model without knowing the params it was built from.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PixArtTransformer2DModel, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from open_clip.model import _build_text_tower
from torch import nn

from dextra.filter.clip import MODEL_INFO, load_clip
from dextra.pipeline.errors import InputError, ParamsError
from dextra.pipeline.params import TrainParams
from dextra.train.rat import RATTransformer2DModel
from dextra.train.text_encoder import CaptionTokenizer, TextEncoderConditioner

# save folder -> class
BACKBONES = {"unet": UNet2DConditionModel, "transformer": PixArtTransformer2DModel, "rat": RATTransformer2DModel}


class ConditionProjector(ModelMixin, ConfigMixin):
    """`pooled` / `image`: an embedding (B, d) -> (B, tokens, cross_attention_dim), or the NULL tokens where `null`
    is set.

    NULL is learned directly as tokens, so "no caption" never has to be expressed as some embedding vector."""

    @register_to_config
    def __init__(self, embed_dim: int, cross_attention_dim: int, tokens: int, mode: str = "pooled"):
        super().__init__()
        self.proj = nn.Linear(embed_dim, tokens * cross_attention_dim)
        self.null = nn.Parameter(torch.randn(tokens, cross_attention_dim) * 0.02)

    @property
    def mode(self) -> str:
        return self.config.mode

    @property
    def condition_size(self) -> int:
        """Length of one condition row: the embedding's dimension."""
        return self.config.embed_dim

    def forward(self, condition: torch.Tensor, null: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.proj(condition).view(len(condition), self.config.tokens, self.config.cross_attention_dim)
        if null is None:
            return tokens
        return torch.where(null[:, None, None], self.null.to(tokens.dtype), tokens)


class TokenConditioner(ModelMixin, ConfigMixin):
    """`tokens`: caption token ids (B, L) -> CLIP's per-token text states (B, L, width) -> (B, L, cross_attention_dim).

    `clip_config` is the open_clip model config the text transformer is built from (models/clip/<model>.json)."""

    mode = "tokens"

    @register_to_config
    def __init__(self, clip_config: dict, cross_attention_dim: int):
        super().__init__()
        text_cfg = {**clip_config["text_cfg"], "output_tokens": True}
        self.text = _build_text_tower(
            clip_config["embed_dim"], text_cfg, quick_gelu=clip_config.get("quick_gelu", False)
        )
        self.proj = nn.Linear(self.text.width, cross_attention_dim)
        self.null = nn.Parameter(torch.randn(self.text.context_length, cross_attention_dim) * 0.02)

    @property
    def condition_size(self) -> int:
        """Length of one condition row: the tokenizer's context length."""
        return self.text.context_length

    @property
    def text_encoder(self) -> nn.Module:
        return self.text

    @classmethod
    def from_clip(cls, folder: Path, cross_attention_dim: int) -> TokenConditioner:
        """A conditioner whose text transformer holds the weights of the CLIP model the `clip` stage saved in
        `folder`."""
        info = json.loads((folder / MODEL_INFO).read_text()) if (folder / MODEL_INFO).exists() else None
        if info is None or not (folder / f"{info['model']}.json").exists():
            raise InputError(f"{folder}: no saved CLIP model and config (run `dextra clip` first)")
        conditioner = cls(json.loads((folder / f"{info['model']}.json").read_text()), cross_attention_dim)
        clip = load_clip(folder).model
        source = clip.text if hasattr(clip, "text") else clip  # open_clip's CustomTextCLIP keeps the tower apart
        wanted = conditioner.text.state_dict()
        conditioner.text.load_state_dict({k: v for k, v in source.state_dict().items() if k in wanted})
        return conditioner

    def forward(self, tokens: torch.Tensor, null: torch.Tensor | None = None) -> torch.Tensor:
        _, states = self.text(tokens.long())
        out = self.proj(states)
        if null is None:
            return out
        return torch.where(null[:, None, None], self.null.to(out.dtype), out)


Conditioner = ConditionProjector | TokenConditioner | TextEncoderConditioner
CONDITIONERS = {cls.__name__: cls for cls in (ConditionProjector, TokenConditioner, TextEncoderConditioner)}


class Denoiser(nn.Module):
    """The backbone's prediction (ε or v, per train.prediction_type) given a condition; one module so DDP and EMA see
    all weights."""

    def __init__(
        self,
        backbone: UNet2DConditionModel | PixArtTransformer2DModel | RATTransformer2DModel,
        condition: Conditioner,
    ):
        super().__init__()
        self.backbone = backbone
        self.condition = condition

    def forward(
        self, sample: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor, null: torch.Tensor | None = None
    ) -> torch.Tensor:
        tokens = self.condition(condition, null)
        timesteps = torch.as_tensor(timesteps, device=sample.device).reshape(-1).expand(len(sample))
        if isinstance(self.backbone, UNet2DConditionModel):
            if self.backbone.config.class_embed_type == "projection":  # train.unet.text_injection: affine
                return self.backbone(sample, timesteps, None, class_labels=tokens.flatten(1)).sample
            return self.backbone(sample, timesteps, encoder_hidden_states=tokens).sample
        if isinstance(self.backbone, RATTransformer2DModel):  # one sentence embedding per image
            return self.backbone(sample, timesteps, tokens.flatten(1))
        return self.backbone(sample, encoder_hidden_states=tokens, timestep=timesteps).sample

    @property
    def sample_size(self) -> int:
        """Side of what the backbone denoises: pixels, or latents for a latent model."""
        return int(self.backbone.config.sample_size)

    @property
    def channels(self) -> int:
        return int(self.backbone.config.in_channels)

    @property
    def mode(self) -> str:
        return self.condition.mode

    @property
    def condition_size(self) -> int:
        return self.condition.condition_size

    @property
    def tokenizer(self) -> CaptionTokenizer | None:
        """The transformers text encoder's tokenizer; None for CLIP's (models/clip has it) and for embeddings."""
        return getattr(self.condition, "tokenizer", None)

    def train_text_encoder(self, enabled: bool) -> None:
        """Freeze (default) or unfreeze the text encoder; only `tokens` conditioning has one."""
        if self.mode == "tokens":
            self.condition.text_encoder.requires_grad_(enabled)

    def save(self, folder: Path) -> None:
        subfolder = next(name for name, kind in BACKBONES.items() if isinstance(self.backbone, kind))
        self.backbone.save_pretrained(folder / subfolder)
        self.condition.save_pretrained(folder / "condition")

    @classmethod
    def load(cls, folder: Path) -> Denoiser:
        saved = [name for name in BACKBONES if (folder / name / "config.json").exists()]
        config = folder / "condition" / "config.json"
        if not saved or not config.exists():
            raise InputError(
                f"{folder}: no saved model (unet/, transformer/ or rat/, and condition/config.json); "
                f"run `dextra {folder.name}` first"
            )
        conditioner = CONDITIONERS[json.loads(config.read_text())["_class_name"]]
        return cls(
            BACKBONES[saved[0]].from_pretrained(folder / saved[0]), conditioner.from_pretrained(folder / "condition")
        )


def load_vae(source: str | Path, field: str = "train.vae") -> AutoencoderKL:
    """An AutoencoderKL from a local folder or the hub, frozen; `field` names where the source came from, for errors."""
    try:
        vae = AutoencoderKL.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ParamsError(
            f"{field}: cannot load an AutoencoderKL from {str(source)!r} ({str(exc).splitlines()[0]})"
        ) from None
    return vae.eval().requires_grad_(False)


def saved_vae(folder: Path) -> AutoencoderKL | None:
    """The VAE a latent model was trained with (folder/vae/), or None for a pixel model."""
    if not (folder / "vae" / "config.json").exists():
        return None
    return AutoencoderKL.from_pretrained(folder / "vae").eval().requires_grad_(False)


def vae_downscale(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def image_resolution(model: Denoiser, vae: AutoencoderKL | None) -> int:
    """The side in pixels of the images `model` generates (through `vae`, for a latent model)."""
    return model.sample_size * (vae_downscale(vae) if vae is not None else 1)


def build_condition(cfg: TrainParams, embed_dim: int, clip_folder: Path) -> Conditioner:
    if cfg.conditioning == "tokens" and cfg.text_encoder:
        return TextEncoderConditioner.create(cfg.text_encoder, cfg.cross_attention_dim)
    if cfg.conditioning == "tokens":
        return TokenConditioner.from_clip(clip_folder, cfg.cross_attention_dim)
    return ConditionProjector(embed_dim, cfg.cross_attention_dim, cfg.condition_tokens, mode=cfg.conditioning)


def _check_patches(size: int, patch_size: int, backbone: str) -> None:
    if size % patch_size:
        raise ParamsError(
            f"train.{backbone}.patch_size: {patch_size} does not divide the {size}-wide input "
            "(train.resolution, after the VAE if any)"
        )


def build_denoiser(
    cfg: TrainParams,
    condition: Conditioner,
    channels: int = 3,
    sample_size: int | None = None,
) -> Denoiser:
    """A fresh backbone from params.train, denoising `channels` × `sample_size`² (pixels, or a VAE's latents)."""
    size = cfg.resolution if sample_size is None else sample_size
    if cfg.backbone == "unet":
        blocks = list(cfg.unet.block_out_channels)
        if size % 2 ** (len(blocks) - 1):
            raise ParamsError(
                f"train.resolution: {size} (after the VAE, if any) must be divisible by 2^{len(blocks) - 1} "
                f"for {len(blocks)} train.unet.block_out_channels"
            )
        common = dict(
            sample_size=size,
            in_channels=channels,
            out_channels=channels,
            block_out_channels=blocks,
            layers_per_block=cfg.unet.layers_per_block,
            cross_attention_dim=cfg.cross_attention_dim,
            # diffusers reads `attention_head_dim` as the number of heads (its documented naming slip), so pass heads.
            attention_head_dim=tuple(max(1, c // cfg.unet.attention_head_dim) for c in blocks),
            norm_num_groups=math.gcd(32, *blocks),
        )
        if cfg.unet.text_injection == "affine":
            # The condition joins the timestep embedding, which scales and shifts every ResNet block's normalised
            # features (adaptive GroupNorm): the affine text injection of RAT-GAN and ADM's class conditioning.
            backbone = UNet2DConditionModel(
                **common,
                down_block_types=["DownBlock2D"] * len(blocks),
                up_block_types=["UpBlock2D"] * len(blocks),
                mid_block_type="UNetMidBlock2D",
                class_embed_type="projection",
                projection_class_embeddings_input_dim=condition.config.tokens * cfg.cross_attention_dim,
                resnet_time_scale_shift="scale_shift",
            )
        else:
            # Attention only below full resolution, where it is cheap.
            cross = len(blocks) - 1 if len(blocks) > 1 else 1
            down = ["DownBlock2D"] * (len(blocks) - cross) + ["CrossAttnDownBlock2D"] * cross
            backbone = UNet2DConditionModel(
                **common, down_block_types=down, up_block_types=[name.replace("Down", "Up") for name in reversed(down)]
            )
    elif cfg.backbone == "rat":
        rat = cfg.rat
        _check_patches(size, rat.patch_size, "rat")
        backbone = RATTransformer2DModel(
            sample_size=size,
            patch_size=rat.patch_size,
            in_channels=channels,
            out_channels=channels,
            width=rat.num_attention_heads * rat.attention_head_dim,
            num_attention_heads=rat.num_attention_heads,
            num_groups=rat.num_groups,
            blocks_per_group=rat.blocks_per_group,
            text_dim=condition.config.tokens * cfg.cross_attention_dim,
            recurrent_dim=rat.recurrent_dim,
        )
    else:
        dit = cfg.dit
        _check_patches(size, dit.patch_size, "dit")
        width = dit.num_attention_heads * dit.attention_head_dim
        backbone = PixArtTransformer2DModel(
            num_attention_heads=dit.num_attention_heads,
            attention_head_dim=dit.attention_head_dim,
            in_channels=channels,
            out_channels=channels,
            num_layers=dit.num_layers,
            cross_attention_dim=width,  # the condition tokens are projected to the transformer's width first
            caption_channels=cfg.cross_attention_dim,
            sample_size=size,
            patch_size=dit.patch_size,
            use_additional_conditions=False,
        )
    return Denoiser(backbone, condition)
