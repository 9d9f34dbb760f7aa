"""The `clip` stage and the one way every later stage loads the CLIP model it saved.

The model comes from open_clip: a model name with a pretrained tag or local checkpoint, or a config bundled in
filter/clip_configs/ (the demo's, trained here from scratch because no weights can be downloaded). With
`clip.train_epochs > 0` it is trained contrastively on the seed train pairs with open_clip's ClipLoss, optionally
with augmented images (`clip.augment`) and a cross-entropy on the seed classes (`clip.class_loss_weight`): trained
from scratch on a thousand images, plain CLIP learns whatever tells a batch's pairs apart most cheaply (the demo's
colours), and the class term makes it also learn what the classes differ in, which the class detector needs.
models/clip/ then holds the config and the weights, so loading needs nothing but that folder.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from open_clip.loss import ClipLoss
from PIL import Image
from torchvision.io import ImageReadMode, decode_image
from tqdm import tqdm

from dextra.pipeline.atomic import atomic_path, write_json
from dextra.pipeline.device import pick_device
from dextra.pipeline.errors import InputError, ParamsError
from dextra.pipeline.params import Params
from dextra.pipeline.paths import Paths
from dextra.pipeline.shards import read_table

BUNDLED_CONFIGS = Path(__file__).parent / "clip_configs"
CHECKPOINT = "checkpoint.pt"
MODEL_INFO = "model.json"


@dataclass
class ClipBundle:
    """A loaded CLIP model with its preprocessing and tokenizer; encoders return L2-normalised float32 arrays."""

    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    device: torch.device
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        out = [
            F.normalize(self.model.encode_text(self.tokenizer(list(texts[i : i + batch_size])).to(self.device)), dim=-1)
            for i in range(0, len(texts), batch_size)
        ]
        return torch.cat(out).float().cpu().numpy() if out else np.zeros((0, self.embed_dim), np.float32)

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Embed float images in [0, 1], shape (N, 3, H, W), of any size: resized and normalised like `preprocess`."""
        pixels = F.interpolate(
            pixels.to(self.device, torch.float32),
            size=(self.image_size, self.image_size),
            mode="bicubic",
            antialias=True,
            align_corners=False,
        )
        mean = torch.tensor(self.mean, device=self.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, -1, 1, 1)
        return F.normalize(self.model.encode_image((pixels.clamp(0, 1) - mean) / std), dim=-1)

    @property
    def embed_dim(self) -> int:
        return (
            int(self.model.text_projection.shape[1])
            if hasattr(self.model, "text_projection")
            else int(self.model.visual.output_dim)
        )


def _register_config(model: str, search: Path) -> None:
    """open_clip only knows its own configs; add ours (bundled, or saved beside a checkpoint) under their file name."""
    config = search / f"{model}.json"
    if config.exists():
        open_clip.add_model_config(config)


def create(model: str, pretrained: str | None, device: torch.device) -> ClipBundle:
    """Build an open_clip model by name; `pretrained` is an open_clip tag or a local checkpoint path."""
    _register_config(model, BUNDLED_CONFIGS)
    if open_clip.get_model_config(model) is None:
        raise ParamsError(f"clip.model: {model!r} is neither an open_clip model nor a config in {BUNDLED_CONFIGS}")
    try:
        clip_model, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained, device=device)
    except RuntimeError as exc:
        raise ParamsError(f"clip.pretrained: cannot load {pretrained!r} for {model} ({exc})") from None
    visual = clip_model.visual
    size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
    return ClipBundle(
        model=clip_model,
        preprocess=preprocess,
        tokenizer=open_clip.get_tokenizer(model),
        device=device,
        image_size=int(size),
        mean=tuple(visual.preprocess_cfg["mean"]),
        std=tuple(visual.preprocess_cfg["std"]),
    )


def load_clip(folder: str | Path, device: torch.device | str = "cpu") -> ClipBundle:
    """Load what the `clip` stage saved in `folder` (models/clip), in eval mode."""
    folder = Path(folder)
    info_path = folder / MODEL_INFO
    if not info_path.exists():
        raise InputError(f"{info_path}: not found (run `dextra clip` first)")
    info = json.loads(info_path.read_text())
    _register_config(info["model"], folder)
    bundle = create(info["model"], str(folder / CHECKPOINT), torch.device(device))
    bundle.model.eval()
    return bundle


def decode(image_bytes: bytes) -> Image.Image:
    return Image.open(io.BytesIO(image_bytes)).convert("RGB")


def decode_pixels(image_bytes: bytes) -> torch.Tensor:
    """uint8 (3, H, W): torchvision's decoders give PIL's pixels (the same libjpeg-turbo and libpng) at a third of
    its per-image cost on small images; PIL for what torchvision lacks (BMP, say) or decodes otherwise (16-bit PNG)."""
    try:
        pixels = decode_image(torch.frombuffer(bytearray(image_bytes), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        pixels = None
    return pixels if pixels is not None and pixels.dtype == torch.uint8 else TF.pil_to_tensor(decode(image_bytes))


def preprocess_pixels(preprocess: Callable, images: Sequence[torch.Tensor]) -> torch.Tensor:
    """The model's own preprocessing (open_clip's transforms take float tensors in [0, 1] as well as PIL images),
    run once per group of same-sized images instead of once per image. Returns (N, 3, S, S) in input order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(images)
    for rows in groups.values():
        for row, pixels in zip(rows, preprocess(torch.stack([images[i] for i in rows]).float().div_(255))):
            out[row] = pixels
    return torch.stack(out)


# augment's ranges: zoom-out scale, extra width factor, degrees, shear, how far past the edge a shift may go, pixel noise
AUGMENT_SCALE, AUGMENT_ASPECT, AUGMENT_DEGREES, AUGMENT_SHEAR, AUGMENT_OVERHANG, AUGMENT_NOISE = (
    (0.55, 1.0),
    (0.75, 1.1),
    20.0,
    0.2,
    0.05,
    0.04,
)


def augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Changes no caption mentions, drawn per image: a zoom-out (scale, aspect ratio, rotation, shear, shift) framed
    with the image's own border colour (not repeated edge pixels, which smear strokes touching the edge into
    streaks), strokes thickened or thinned by a 3x3 max or min filter, a light blur, light pixel noise. Never colour
    changes or flips ("a red 3" stays red, and a mirrored 3 is no 3). Pixels in [0, 1], (N, 3, H, W)."""
    n = len(pixels)
    uniform = lambda low, high: low + (high - low) * torch.rand(n, generator=generator)
    # the colour the zoomed-out image is framed with: the median of its outermost pixels (its background, mostly)
    ring = torch.cat([pixels[:, :, 0, :], pixels[:, :, -1, :], pixels[:, :, :, 0], pixels[:, :, :, -1]], 2)
    median = ring.median(dim=2, keepdim=True).values
    nearest = (ring - median).abs().sum(1).argmin(1)  # an actual border colour, the one nearest the median
    fill = ring.gather(2, nearest[:, None, None].expand(-1, 3, 1))[..., None]
    size = uniform(*AUGMENT_SCALE)
    sx, sy = size * uniform(*AUGMENT_ASPECT), size
    angle = uniform(-AUGMENT_DEGREES, AUGMENT_DEGREES) * np.pi / 180
    shear = uniform(-AUGMENT_SHEAR, AUGMENT_SHEAR)
    cos, sin, zero, one = torch.cos(angle), torch.sin(angle), torch.zeros(n), torch.ones(n)
    rotation = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
    shearing = torch.stack([torch.stack([one, shear], 1), torch.stack([zero, one], 1)], 1)
    scaling = torch.diag_embed(torch.stack([sx, sy], 1))
    forward = rotation @ shearing @ scaling  # input -> output coordinates
    room = torch.stack([(1 - sx).clamp(min=0) + AUGMENT_OVERHANG, (1 - sy).clamp(min=0) + AUGMENT_OVERHANG], 1)
    shift = torch.stack([uniform(-1, 1), uniform(-1, 1)], 1) * room
    inverse = torch.linalg.inv(forward)
    theta = torch.cat([inverse, -(inverse @ shift[..., None])], 2)
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    out = F.grid_sample(pixels - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
    stroke = torch.rand(n, generator=generator)[:, None, None, None]
    out = torch.where(
        stroke < 0.2, F.max_pool2d(out, 3, 1, 1), torch.where(stroke > 0.8, -F.max_pool2d(-out, 3, 1, 1), out)
    )
    blur = torch.rand(n, generator=generator)[:, None, None, None] < 0.3
    out = torch.where(blur, TF.gaussian_blur(out, [3, 3], [0.8, 0.8]), out)
    sigma = torch.where(torch.rand(n, generator=generator) < 0.3, uniform(0, AUGMENT_NOISE), torch.zeros(n))[
        :, None, None, None
    ]
    return (out + sigma * torch.randn(out.shape, generator=generator)).clamp(0, 1)


class _Objective(torch.nn.Module):
    """open_clip's ClipLoss, plus `weight` x cross-entropy of a linear head on the image features (scaled by
    CLIP's own temperature) against the seed classes, when there are classes and a weight."""

    def __init__(self, embed_dim: int, n_classes: int, weight: float):
        super().__init__()
        self.clip_loss, self.weight = ClipLoss(), weight if n_classes > 1 else 0.0
        self.head = torch.nn.Linear(embed_dim, n_classes) if self.weight else None

    def forward(
        self, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, labels: torch.Tensor | None
    ) -> torch.Tensor:
        loss = self.clip_loss(image, text, scale)
        return loss + self.weight * F.cross_entropy(self.head(image) * scale, labels) if self.head is not None else loss


def _pairs_loss(
    bundle: ClipBundle,
    pixels: torch.Tensor,
    texts: torch.Tensor,
    labels: torch.Tensor,
    objective: _Objective,
    batch_size: int,
) -> float:
    """Mean training objective over fixed batches, without gradients: the held-out score for early stopping."""
    losses = []
    with torch.no_grad():
        for start in range(0, len(pixels), batch_size):
            part = slice(start, start + batch_size)
            image, text, scale = bundle.model(pixels[part].to(bundle.device), texts[part].to(bundle.device))
            losses.append(objective(image, text, scale, labels[part].to(bundle.device)).item())
    return float(np.mean(losses))


def train_contrastive(
    bundle: ClipBundle,
    images: Sequence[bytes],
    captions: Sequence[Sequence[str]],
    params: Params,
    classes: Sequence[str | None] | None = None,
) -> list[dict]:
    """Contrastive training on (image, random one of its captions) pairs, keeping the weights of the epoch with
    the lowest loss on a held-out part of the pairs (first captions; with clip.augment, images augmented once, so
    the score judges varied compositions), and stopping after `patience` epochs without a better one. `classes`
    (one per image, None where unknown) feed the class term when `clip.class_loss_weight` > 0 and every image has
    one. Returns per-epoch train and held-out losses."""
    cfg = params.clip
    generator = torch.Generator().manual_seed(params.seed)
    rng = random.Random(params.seed)
    pixels = preprocess_pixels(bundle.preprocess, [decode_pixels(b) for b in images])
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (bundle.mean, bundle.std))
    augmented = lambda normalised, draws: (augment(normalised * std + mean, draws) - mean) / std  # noqa: E731 (augment works on [0, 1] pixels)
    index = (
        {name: i for i, name in enumerate(sorted(set(classes)))} if classes is not None and None not in classes else {}
    )
    labels = torch.tensor([index[c] for c in classes]) if index else torch.zeros(len(images), dtype=torch.long)
    objective = _Objective(bundle.embed_dim, len(index), cfg.class_loss_weight).to(bundle.device)
    order = torch.randperm(len(images), generator=generator)
    n_holdout = int(round(len(images) * cfg.holdout_fraction)) if len(images) >= 4 else 0
    held, train = order[:n_holdout], order[n_holdout:]
    held_texts = bundle.tokenizer([captions[i][0] for i in held.tolist()]) if n_holdout else None
    held_pixels = pixels[held]
    if cfg.augment and n_holdout:  # augmented once, with a generator of its own: the same held-out images every epoch
        held_pixels = augmented(held_pixels, torch.Generator().manual_seed(params.seed + 1))
    model = bundle.model
    optimizer = torch.optim.AdamW(
        [*model.parameters(), *objective.parameters()], lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    batch_size = min(cfg.batch_size, len(train))
    steps_per_epoch = max(1, len(train) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=cfg.train_epochs * steps_per_epoch, pct_start=0.1
    )
    history: list[dict] = []
    best_loss, best_epoch = float("inf"), 0
    best_state = {
        k: v.detach().clone() for k, v in model.state_dict().items()
    }  # if no epoch beats the start (diverged)
    for epoch in tqdm(range(cfg.train_epochs), desc="clip", unit="epoch"):
        model.train()
        shuffled = train[torch.randperm(len(train), generator=generator)]
        losses = []
        for step in range(steps_per_epoch):
            batch = shuffled[step * batch_size : (step + 1) * batch_size]
            texts = bundle.tokenizer([rng.choice(captions[i]) for i in batch.tolist()]).to(bundle.device)
            batch_pixels = augmented(pixels[batch], generator) if cfg.augment else pixels[batch]
            image_features, text_features, logit_scale = model(batch_pixels.to(bundle.device), texts)
            loss = objective(image_features, text_features, logit_scale, labels[batch].to(bundle.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        model.eval()
        held_loss = (
            _pairs_loss(bundle, held_pixels, held_texts, labels[held], objective, batch_size)
            if n_holdout
            else float(np.mean(losses))
        )
        history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "heldout_loss": held_loss})
        if held_loss < best_loss:
            best_loss, best_epoch, best_state = (
                held_loss,
                epoch,
                {k: v.detach().clone() for k, v in model.state_dict().items()},
            )
        elif epoch - best_epoch >= cfg.patience:
            break
    model.load_state_dict(best_state)
    model.eval()
    return history


@torch.no_grad()
def retrieval_recall(
    bundle: ClipBundle,
    images: Sequence[bytes],
    captions: Sequence[Sequence[str]],
    params: Params,
    ks: Sequence[int] = (1, 5),
) -> dict:
    """Image→text (any of the image's captions in the top k) and text→image (its image in the top k) recall."""
    from dextra.filter.embed import embed_images  # embed builds on this module

    image_features = torch.from_numpy(embed_images(bundle, list(images), params)[0])
    owner = torch.tensor([i for i, texts in enumerate(captions) for _ in texts])
    text_features = torch.from_numpy(bundle.encode_texts([t for texts in captions for t in texts]))
    similarity = image_features @ text_features.T
    out = {}
    for k in ks:
        top_texts = similarity.topk(min(k, similarity.shape[1]), dim=1).indices
        out[f"image_to_text_r{k}"] = float(
            (owner[top_texts] == torch.arange(len(images))[:, None]).any(dim=1).float().mean()
        )
        top_images = similarity.T.topk(min(k, similarity.shape[0]), dim=1).indices
        out[f"text_to_image_r{k}"] = float((top_images == owner[:, None]).any(dim=1).float().mean())
    return out


def run(params: Params, paths: Paths) -> dict:
    torch.manual_seed(params.seed)
    device = pick_device(params.device)
    bundle = create(params.clip.model, params.clip.pretrained, device)
    bundle.model.eval()
    history: list[dict] = []
    if params.clip.train_epochs:
        train = read_table(paths.seed_split("train"), columns=["image", "captions", "class"])
        if train.num_rows < 2:
            raise InputError(
                f"{paths.seed_split('train')}: needs at least 2 images to train CLIP, has {train.num_rows}"
            )
        history = train_contrastive(
            bundle,
            train.column("image").to_pylist(),
            train.column("captions").to_pylist(),
            params,
            train.column("class").to_pylist(),
        )
    test = read_table(paths.seed_split("test"), columns=["image", "captions"])
    recall = retrieval_recall(bundle, test.column("image").to_pylist(), test.column("captions").to_pylist(), params)
    with atomic_path(paths.clip) as tmp:
        tmp.mkdir()
        torch.save({"state_dict": bundle.model.state_dict()}, tmp / CHECKPOINT)
        (tmp / f"{params.clip.model}.json").write_text(
            json.dumps(open_clip.get_model_config(params.clip.model), indent=2)
        )
        write_json(
            tmp / MODEL_INFO, {"model": params.clip.model, "pretrained": params.clip.pretrained, "epochs": history}
        )
    write_json(paths.metrics / "clip.json", {**recall, "test_images": test.num_rows, "epochs_trained": len(history)})
    best = min(history, key=lambda e: e["heldout_loss"]) if history else None
    return {
        "model": params.clip.model,
        "epochs": len(history),
        "best_epoch": best and best["epoch"],
        **{k: round(v, 3) for k, v in recall.items()},
    }
