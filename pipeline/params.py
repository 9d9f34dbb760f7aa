"""The one params schema. Every stage validates the whole of params.yaml before it touches a file,
so a typo in any section stops the run with a message naming the field, not a traceback mid-stage."""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ParamsError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DemoParams(_Section):
    """Size of the embedded synthetic demo (seed set and synthetic web)."""

    n_seed: int = Field(1500, ge=20, le=1797, description="seed images drawn from scikit-learn's 1,797 digits")
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    n_web: int = Field(3000, ge=50, le=100_000, description="synthetic web URLs")
    image_size: int = Field(32, ge=16, le=256, description="seed image side in pixels")


class FetchParams(_Section):
    image_size: int = Field(64, ge=8, le=4096, description="stored crawl images are resized to this side")
    resize_mode: Literal["no", "keep_ratio", "center_crop", "border"] = "keep_ratio"
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(95, ge=1, le=100, description="JPEG/WebP quality, or PNG compression level")
    processes: int = Field(2, ge=1, le=512)
    threads: int = Field(16, ge=1, le=1024)
    timeout_s: float = Field(10.0, gt=0)
    retries: int = Field(0, ge=0, le=10)
    shard_size: int = Field(10_000, ge=1, description="URLs per img2dataset shard")

    @model_validator(mode="after")
    def _png_level(self) -> "FetchParams":
        if self.encode_format == "png" and self.encode_quality > 9:
            raise ValueError("encode_quality is the PNG compression level (1-9) when encode_format is png")
        return self


class ClipParams(_Section):
    model: str = Field(description="open_clip model name (e.g. ViT-B-32) or a bundled config name")
    pretrained: Optional[str] = Field(None, description="open_clip pretrained tag or a local checkpoint path")
    train_epochs: int = Field(0, ge=0, le=10_000, description="contrastive epochs on seed train pairs; 0 keeps the loaded weights")
    batch_size: int = Field(128, ge=2, le=65_536)
    lr: float = Field(5e-4, gt=0, le=1.0)
    weight_decay: float = Field(0.1, ge=0, le=10.0)


class EmbedParams(_Section):
    batch_size: int = Field(256, ge=1, le=65_536)
    num_workers: int = Field(0, ge=0, le=64)


class CurateParams(_Section):
    k_neighbors: int = Field(5, ge=1, le=256, description="seed neighbours used for the text extrapolation")
    ridge: float = Field(0.01, ge=0, le=100.0, description="ridge term of the least-squares weights")
    distance_k: int = Field(5, ge=1, le=256, description="neighbours averaged for the distance-to-seed score")
    distance_percentile: float = Field(5.0, ge=0, le=100, description="seed's own kNN-similarity percentile used as the keep threshold")
    leak_similarity: float = Field(0.95, ge=-1, le=1, description="image similarity to a seed test image above which a crawled image is a leak")


class ReportParams(_Section):
    gallery_size: int = Field(24, ge=0, le=1000)


class UNetParams(_Section):
    block_out_channels: list[int] = Field([16, 32, 32], min_length=1, max_length=6)
    layers_per_block: int = Field(1, ge=1, le=8)
    attention_head_dim: int = Field(32, ge=1, le=256, description="channels per attention head")
    cross_attention_dim: int = Field(64, ge=8, le=4096)
    condition_tokens: int = Field(4, ge=1, le=77, description="tokens the pooled text embedding is projected to")


class TrainParams(_Section):
    """Shared by pretrain and finetune."""

    resolution: int = Field(32, ge=8, le=1024)
    batch_size: int = Field(32, ge=1, le=65_536)
    unet: UNetParams = UNetParams()
    random_flip: bool = Field(True, description="mirror training images left-right; off when mirroring changes what the caption says")
    condition_dropout: float = Field(0.1, ge=0, lt=1, description="probability of training on the NULL condition")
    num_train_timesteps: int = Field(1000, ge=10, le=10_000)
    prediction_type: Literal["epsilon", "v_prediction"] = Field(
        "v_prediction", description="what the UNet predicts; v learns the condition's colours and layout in far fewer steps"
    )
    ema_decay: float = Field(0.999, ge=0, lt=1)
    grad_clip: float = Field(1.0, gt=0)
    log_every: int = Field(10, ge=1)


class PhaseParams(_Section):
    steps: int = Field(ge=1, le=10_000_000)
    lr: float = Field(gt=0, le=1.0)
    warmup_steps: int = Field(0, ge=0)


class EvaluateParams(_Section):
    num_samples: int = Field(200, ge=2, le=100_000)
    guidance_scale: float = Field(3.0, ge=0, le=100)
    sampling_steps: int = Field(25, ge=1, le=1000)
    batch_size: int = Field(100, ge=1, le=65_536)


class Params(_Section):
    dataset: str = Field(description="manifest name under manifests/ (demo, cub, oxford, coco or your own)")
    seed: int = Field(0, ge=0, description="random seed for every stage")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    demo: DemoParams = DemoParams()
    fetch: FetchParams = FetchParams()
    clip: ClipParams
    embed: EmbedParams = EmbedParams()
    curate: CurateParams = CurateParams()
    report: ReportParams = ReportParams()
    train: TrainParams = TrainParams()
    pretrain: PhaseParams
    finetune: PhaseParams
    evaluate: EvaluateParams = EvaluateParams()


def _describe(error: dict) -> str:
    field = ".".join(str(part) for part in error["loc"]) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{field}: unknown key (check the spelling; allowed keys are in pipeline/params.py)"
    if kind == "missing":
        return f"{field}: required but missing"
    return f"{field}: {error['msg'][0].lower()}{error['msg'][1:]} (got {error.get('input')!r})"


def parse_params(raw: object, source: str = "params.yaml") -> Params:
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors())
        raise ParamsError(f"{source}: {problems}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found (run from the repository root or pass --params)") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return parse_params(raw, str(path))
