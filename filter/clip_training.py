"""Adapting a CLIP model to a seed set: contrastive training on its (image, caption) pairs with open_clip's
ClipLoss, optionally with augmented images (`clip.augment`) and a cross-entropy on the seed classes
(`clip.class_loss_weight`). Trained on a thousand images, plain CLIP learns whatever tells a batch's pairs apart most
cheaply (the demo's colours); the class term makes it also learn what the classes differ in, which the class
detector needs. Also the retrieval recall that says how well a model matches images and captions.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from open_clip.loss import ClipLoss
from tqdm import tqdm

from dextra.filter.clip import ClipBundle, decode_pixels, preprocess_pixels
from dextra.filter.embed import embed_images
from dextra.pipeline.params import ClipParams

# augment's ranges: zoom-out scale, extra width factor, degrees, shear, how far past the edge a shift may go,
# pixel noise
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

    def uniform(low, high):
        return low + (high - low) * torch.rand(n, generator=generator)

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
    cfg: ClipParams,
    seed: int,
    classes: Sequence[str | None] | None = None,
) -> list[dict]:
    """Contrastive training on (image, random one of its captions) pairs, keeping the weights of the epoch with
    the lowest loss on a held-out part of the pairs (first captions; with clip.augment, images augmented once, so
    the score judges varied compositions), and stopping after `patience` epochs without a better one. `classes`
    (one per image, None where unknown) feed the class term when `clip.class_loss_weight` > 0 and every image has
    one. Returns per-epoch train and held-out losses."""
    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
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
        held_pixels = augmented(held_pixels, torch.Generator().manual_seed(seed + 1))
    model = bundle.model
    optimizer = torch.optim.AdamW(
        [*model.parameters(), *objective.parameters()], lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True
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
    batch_size: int = 256,
    ks: Sequence[int] = (1, 5),
) -> dict:
    """Image→text (any of the image's captions in the top k) and text→image (its image in the top k) recall."""
    image_features = torch.from_numpy(embed_images(bundle, list(images), batch_size)[0])
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
