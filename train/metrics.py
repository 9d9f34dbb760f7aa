"""How generated images are scored, by evaluate and at every training checkpoint.

- CLIP-FD: Fréchet distance between CLIP image features of generated and real test images (torchmetrics'
  FrechetInceptionDistance with CLIP as the feature network; needs no Inception weights, which the demo has to
  live without). Features are L2-normalised, so values are small (0 = same distribution) and not comparable with
  the paper's Inception FIDs.
- FID: the standard Inception-v3 pool features (torchmetrics over torch-fidelity), from a local weights file
  (evaluate.inception_weights): nothing is downloaded at run time.
- CLIP score: torchmetrics' CLIPScore convention, 100 × mean max(cos(image, caption), 0); its own class only
  takes Hugging Face CLIP models, not our open_clip one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from dextra.filter.clip import ClipBundle, load_clip
from dextra.pipeline.errors import InputError
from dextra.pipeline.paths import Paths
from dextra.train.data import Encoding, TrainingSet, load_seed

MONITOR_BATCH = 256


class ClipFeatures(nn.Module):
    """CLIP image features as torchmetrics' `feature=` network; with normalize=True it gets floats in [0, 1]."""

    def __init__(self, bundle: ClipBundle):
        super().__init__()
        self.bundle = bundle  # a plain attribute: the CLIP weights stay out of the metric's state
        self.num_features = bundle.embed_dim

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.bundle.encode_pixels(pixels)


class Frechet:
    """A Fréchet distance to fixed real images: their features are extracted once, however many image sets
    (the model, the seed-only baseline) are scored against them."""

    def __init__(self, metric: FrechetInceptionDistance, real: torch.Tensor, batch_size: int):
        self.metric, self.batch_size = metric, batch_size
        for chunk in real.split(batch_size):
            metric.update(chunk.to(metric.device), real=True)

    def __call__(self, generated: torch.Tensor) -> float:
        self.metric.reset()  # keeps the real images' statistics (reset_real_features=False)
        for chunk in generated.split(self.batch_size):
            self.metric.update(chunk.to(self.metric.device), real=False)
        return float(self.metric.compute())


def clip_frechet(bundle: ClipBundle, real: torch.Tensor, batch_size: int) -> Frechet:
    metric = FrechetInceptionDistance(feature=ClipFeatures(bundle), normalize=True, reset_real_features=False)
    return Frechet(metric.to(bundle.device), real, batch_size)


def inception_frechet(weights: Path, real: torch.Tensor, batch_size: int, device: torch.device) -> Frechet:
    """FID on Inception-v3's 2048 pool features; `weights` is torch-fidelity's pt_inception state dict."""
    metric = FrechetInceptionDistance(
        feature=2048, normalize=True, reset_real_features=False, feature_extractor_weights_path=str(weights)
    )
    return Frechet(metric.to(device), real, batch_size)


def clip_fd(bundle: ClipBundle, real: torch.Tensor, generated: torch.Tensor, batch_size: int) -> float:
    return clip_frechet(bundle, real, batch_size)(generated)


def clip_score(bundle: ClipBundle, images: torch.Tensor, captions: Sequence[str], batch_size: int) -> float:
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


@dataclass
class TestPrompts:
    """Seed test captions to sample for, with the real test images they are scored against."""

    conditions: torch.Tensor  # one row per sample: caption embedding, or token ids for a `tokens` model
    captions: list[str]
    image_index: torch.Tensor  # the test image each caption belongs to
    real: torch.Tensor  # every test image in [0, 1] at the generated resolution

    @classmethod
    def load(cls, paths: Paths, model_mode: str, resolution: int, num_samples: int, seed: int) -> TestPrompts:
        # An `image` model is sampled from caption text embeddings: they share CLIP's space with image embeddings.
        mode = "tokens" if model_mode == "tokens" else "pooled"
        test, captions = load_seed(paths, "test", Encoding.create(paths, resolution, mode))
        if len(test) < 2:
            raise InputError(
                f"{paths.seed_split('test')}: the Fréchet distance needs at least 2 test images, found {len(test)}"
            )
        image_index, rows = pick_captions(test, num_samples, seed)
        return cls(test.condition_rows(rows), [captions[r] for r in rows], torch.from_numpy(image_index), test.pixels())


class CheckpointMonitor:
    """CLIP-FD of the EMA model's samples for seed test captions, at every checkpoint: the curve shows whether more
    steps still bring samples closer to the test set, and for pretrain how far the extra set alone gets."""

    def __init__(
        self, paths: Paths, model_mode: str, resolution: int, num_samples: int, seed: int, device: torch.device
    ):
        self.prompts = TestPrompts.load(paths, model_mode, resolution, num_samples, seed)
        self.distance = clip_frechet(
            load_clip(paths.clip, device), self.prompts.real, MONITOR_BATCH
        )  # real features once

    def clip_fd(self, generate: Callable[[torch.Tensor], torch.Tensor]) -> float:
        return self.distance(generate(self.prompts.conditions))


def score(
    distances: dict[str, Frechet], bundle: ClipBundle, prompts: TestPrompts, generated: torch.Tensor, batch_size: int
) -> dict[str, float]:
    """Every distance to the real test images, and the CLIP score of `generated` against the prompts' captions."""
    return {
        **{name: distance(generated) for name, distance in distances.items()},
        "clip_score": clip_score(bundle, generated, prompts.captions, batch_size),
    }
