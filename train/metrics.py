"""How generated images are scored, by evaluate and at every training checkpoint.

- CLIP-FD: Fréchet distance between CLIP image features of generated and real test images (torchmetrics'
  FrechetInceptionDistance with CLIP as the feature network; needs no Inception weights, which the demo has to
  live without). Features are L2-normalised, so values are small (0 = same distribution) and not comparable with
  the paper's Inception FIDs.
- FID: the standard Inception-v3 pool features (torchmetrics over torch-fidelity), from a local weights file
  (evaluate.inception_weights): nothing is downloaded at run time.
- Inception Score: torchmetrics' InceptionScore on the same local Inception-v3 weights.
- FID and Inception Score of a fine-tuned Inception-v3 (evaluate.finetuned_inception): the evaluator behind the
  StackGAN / AttnGAN / RAT-Diffusion CUB and Oxford numbers, an Inception-v3 fine-tuned on the dataset's classes;
  only these are comparable with those papers' tables.
- CLIP score: torchmetrics' CLIPScore convention, 100 × mean max(cos(image, caption), 0); its own class only
  takes Hugging Face CLIP models, not our open_clip one. `clipscore` is the CLIPScore paper's w × max(cos, 0) with
  w = 2.5, with the stage's CLIP or any open_clip model (evaluate.clipscore_model).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
from torchmetrics.image.inception import InceptionScore
from torchvision.models import inception_v3
from torchvision.models.feature_extraction import create_feature_extractor

from dextra.filter.clip import ClipBundle, load_clip
from dextra.pipeline.errors import InputError
from dextra.pipeline.paths import Paths
from dextra.train.data import Encoding, TrainingSet, load_seed
from dextra.train.text_encoder import CaptionTokenizer

MONITOR_BATCH = 256
CLIPSCORE_W = 2.5  # CLIPScore's rescaling of max(cos, 0)
INCEPTION_SPLITS = 10


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


class FinetunedInception(nn.Module):
    """A torchvision Inception-v3 fine-tuned on the dataset's classes, from a local state dict; the class count is
    read from its fc layer. It returns both its 2048-d pool features (its FID) and its class logits (its Inception
    Score); `output` picks one for a metric. Images in [0, 1] are resized to 299 and scaled to [-1, 1], as that
    evaluator's Inception takes them."""

    def __init__(self, weights: Path):
        super().__init__()
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, pickle.UnpicklingError) as exc:
            raise InputError(f"evaluate.finetuned_inception: cannot read {weights} ({exc})") from None
        state = state.get("state_dict", state)
        if "fc.weight" not in state:
            raise InputError(f"evaluate.finetuned_inception: {weights} is no Inception-v3 state dict (no fc.weight)")
        self.num_classes = int(state["fc.weight"].shape[0])
        net = inception_v3(
            weights=None, aux_logits="AuxLogits.fc.weight" in state, init_weights=False, num_classes=self.num_classes
        )
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            raise InputError(
                f"evaluate.finetuned_inception: {weights} does not fit torchvision's Inception-v3 "
                f"({str(exc).splitlines()[0]})"
            ) from None
        self.extractor = create_feature_extractor(net.eval().requires_grad_(False), {"flatten": "pool", "fc": "logits"})

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        pixels = F.interpolate(pixels.float(), size=(299, 299), mode="bilinear", align_corners=False)
        return self.extractor(pixels * 2 - 1)


class _Output(nn.Module):
    """One output of a shared FinetunedInception, as torchmetrics' `feature=` network."""

    def __init__(self, network: FinetunedInception, output: str):
        super().__init__()
        self.network, self.output = network, output
        self.num_features = 2048 if output == "pool" else network.num_classes

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.network(pixels)[self.output]


def finetuned_inception_frechet(
    network: FinetunedInception, real: torch.Tensor, batch_size: int, device: torch.device
) -> Frechet:
    metric = FrechetInceptionDistance(feature=_Output(network, "pool"), normalize=True, reset_real_features=False)
    return Frechet(metric.to(device), real, batch_size)


class Inception:
    """The Inception Score of an image set: exp(E KL(p(y|x) ‖ p(y))) over INCEPTION_SPLITS splits (their mean)."""

    def __init__(self, metric: InceptionScore, batch_size: int):
        self.metric, self.batch_size = metric, batch_size

    def __call__(self, generated: torch.Tensor) -> float:
        self.metric.reset()
        for chunk in generated.split(self.batch_size):
            self.metric.update(chunk.to(self.metric.device))
        return float(self.metric.compute()[0])


def inception_score(weights: Path, batch_size: int, device: torch.device) -> Inception:
    """With torch-fidelity's Inception-v3 weights (the standard Inception Score)."""
    network = NoTrainInceptionV3(
        "inception-v3-compat", ["logits_unbiased"], feature_extractor_weights_path=str(weights)
    )
    return Inception(InceptionScore(feature=network, splits=INCEPTION_SPLITS, normalize=True).to(device), batch_size)


def finetuned_inception_score(network: FinetunedInception, batch_size: int, device: torch.device) -> Inception:
    metric = InceptionScore(feature=_Output(network, "logits"), splits=INCEPTION_SPLITS)
    return Inception(metric.to(device), batch_size)


def clip_fd(bundle: ClipBundle, real: torch.Tensor, generated: torch.Tensor, batch_size: int) -> float:
    return clip_frechet(bundle, real, batch_size)(generated)


def clip_score(
    bundle: ClipBundle, images: torch.Tensor, captions: Sequence[str], batch_size: int, scale: float = 100
) -> float:
    """`scale` × mean max(cos(image, caption), 0): 100 for torchmetrics' CLIP score, CLIPSCORE_W for CLIPScore's."""
    texts = torch.from_numpy(bundle.encode_texts(list(captions)))
    pixels = torch.cat([bundle.encode_pixels(chunk).float().cpu() for chunk in images.split(batch_size)])
    return float(scale * (pixels * texts).sum(-1).clamp(min=0).mean())


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
    def load(
        cls,
        paths: Paths,
        model_mode: str,
        resolution: int,
        num_samples: int,
        seed: int,
        tokenizer: CaptionTokenizer | None = None,
    ) -> TestPrompts:
        """`tokenizer`: a transformers text encoder's (Denoiser.tokenizer), for a `tokens` model that has one."""
        # An `image` model is sampled from caption text embeddings: they share CLIP's space with image embeddings.
        mode = "tokens" if model_mode == "tokens" else "pooled"
        test, captions = load_seed(paths, "test", Encoding.create(paths, resolution, mode, tokenizer=tokenizer))
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
        self,
        paths: Paths,
        model_mode: str,
        resolution: int,
        num_samples: int,
        seed: int,
        device: torch.device,
        tokenizer: CaptionTokenizer | None = None,
    ):
        self.prompts = TestPrompts.load(paths, model_mode, resolution, num_samples, seed, tokenizer)
        self.distance = clip_frechet(
            load_clip(paths.clip, device), self.prompts.real, MONITOR_BATCH
        )  # real features once

    def clip_fd(self, generate: Callable[[torch.Tensor], torch.Tensor]) -> float:
        return self.distance(generate(self.prompts.conditions))


def score(
    image_metrics: dict[str, Callable[[torch.Tensor], float]],
    bundle: ClipBundle,
    clipscore_bundle: ClipBundle,
    prompts: TestPrompts,
    generated: torch.Tensor,
    batch_size: int,
) -> dict[str, float]:
    """Every image-set metric (distances to the real test images, Inception Scores), and the CLIP scores of
    `generated` against the prompts' captions."""
    return {
        **{name: metric(generated) for name, metric in image_metrics.items()},
        "clip_score": clip_score(bundle, generated, prompts.captions, batch_size),
        "clipscore": clip_score(clipscore_bundle, generated, prompts.captions, batch_size, CLIPSCORE_W),
    }
