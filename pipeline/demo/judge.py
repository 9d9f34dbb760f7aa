"""An independent judge of the demo's samples: a small CNN that reads the digit, the foreground colour and the
background colour of an image, trained on images drawn for it here (its own random streams, never a load_digits sample
behind a seed test image) and on nothing the pipeline's CLIP learned. Scoring a generated sample against its caption
gives caption_accuracy (all three as captioned) and one accuracy per attribute: evaluate reports them beside the CLIP
score, which the pipeline's own CLIP measures and so shares its blind spots. Written by hand because it is the demo's
ground truth for pictures, as truth.parquet is for the web: a torch classifier of known attributes, nothing more.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dextra.pipeline.atomic import atomic_path
from dextra.pipeline.demo.draw import (
    COLOR_PAIRS,
    COLORS,
    SEED_TEXTURES,
    WEB_TEXTURES,
    compose,
    digit_mask,
    draw_texture,
    font_faces,
    glyph_mask,
    parse_caption,
    parse_colors,
    sample_mask,
)
from dextra.pipeline.demo.seed import digits, seed_order
from dextra.pipeline.params import Params

ATTRIBUTES = ("digit", "fg", "bg")
RESOLUTION = 16  # the judge reads every image at 16 px: load_digits is 8x8, so the digit stays legible
IMAGES, STEPS, BATCH, LR = 6000, 600, 128, 5e-3
TRAIN_PURPOSE, HELDOUT_PURPOSE = 10, 11  # random streams of their own (pipeline/demo/web.py uses 2 to 7)


class Judge(nn.Module):
    """Three conv blocks and one head per attribute: 10 digits, len(COLORS) foreground and background colours."""

    def __init__(self, width: int = 16):
        super().__init__()

        def block(i: int, o: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
                nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
            )  # fmt: skip

        self.features = nn.Sequential(
            block(3, width), nn.MaxPool2d(2), block(width, 2 * width), nn.MaxPool2d(2),
            block(2 * width, 2 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.heads = nn.ModuleList([nn.Linear(2 * width, n) for n in (10, len(COLORS), len(COLORS))])

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """Pixels in [0, 1], (N, 3, R, R) -> logits per attribute."""
        h = self.features(pixels * 2 - 1)
        return [head(h) for head in self.heads]


def to_judge(pixels: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1], (N, 3, H, W), at the judge's resolution (antialiased bicubic, as training data)."""
    pixels = pixels.float()
    if pixels.shape[-1] != RESOLUTION or pixels.shape[-2] != RESOLUTION:
        pixels = F.interpolate(
            pixels, size=(RESOLUTION, RESOLUTION), mode="bicubic", antialias=True, align_corners=False
        )
    return pixels.clamp(0, 1)


def judge_images(params: Params, n: int, exclude: set[int], purpose: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labelled images: float (n, 3, R, R) and (n, 3) labels (digit, foreground and background index in COLORS). Two
    thirds seed-style (a whole load_digits sample on a seed texture), a third web-style (a font glyph or a placed,
    slanted handwritten sample on any texture); load_digits samples in `exclude` are never drawn."""
    images, target = digits()
    pool = np.array([i for i in range(len(target)) if i not in exclude])
    names, size = list(COLORS), params.demo.image_size
    out, labels = np.zeros((n, size, size, 3), np.uint8), np.zeros((n, 3), np.int64)
    for i in range(n):
        rng = np.random.default_rng([params.seed, purpose, i])
        fg, bg = COLOR_PAIRS[rng.integers(len(COLOR_PAIRS))]
        sample = int(pool[rng.integers(len(pool))])
        if rng.random() < 0.67:
            texture = SEED_TEXTURES[rng.integers(len(SEED_TEXTURES))]
            mask = digit_mask(images[sample], size)
        else:
            texture = WEB_TEXTURES[rng.integers(len(WEB_TEXTURES))]
            if rng.random() < 0.5:
                mask = sample_mask(rng, images[sample], size, size)
            else:
                mask = glyph_mask(rng, str(target[sample]), size, size, font_faces()[rng.integers(len(font_faces()))])
        out[i] = compose(mask, fg, draw_texture(texture, bg, size, size, rng))
        labels[i] = (int(target[sample]), names.index(fg), names.index(bg))
    return to_judge(torch.from_numpy(out).permute(0, 3, 1, 2).float() / 255), torch.from_numpy(labels)


def seed_test_samples(params: Params, test_ids: Sequence[str]) -> set[int]:
    """The load_digits samples behind the seed test images (ids demo-<i>): the judge never trains on them."""
    order = seed_order(params)[0]
    return {int(order[int(i.rsplit("-", 1)[1])]) for i in test_ids}


def cached_judge(params: Params, exclude: set[int], cache: Path) -> tuple[Judge, dict]:
    """train_judge's result, kept in the folder `cache` under a key naming everything it depends on: a judge
    costs about 25 s on two cores, and evaluate runs again whenever a model changes."""
    key = {"format": 1, "seed": params.seed, "demo": params.demo.model_dump(), "exclude": sorted(exclude),
           "images": IMAGES, "steps": STEPS, "resolution": RESOLUTION}  # fmt: skip
    path = cache / f"judge-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}.pt"
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        judge = Judge()
        judge.load_state_dict(saved["state_dict"])
        return judge.eval(), saved["heldout"]
    judge, heldout = train_judge(params, exclude)
    with atomic_path(path) as tmp:
        torch.save({"state_dict": judge.state_dict(), "heldout": heldout}, tmp)
    return judge, heldout


def train_judge(params: Params, exclude: set[int], n: int = IMAGES, steps: int = STEPS) -> tuple[Judge, dict]:
    """A judge trained on `n` drawn images, seeded by params.seed; returns it (eval mode) with its accuracies on
    1,000 fresh drawn images (a stream of its own)."""
    x, y = judge_images(params, n, exclude, TRAIN_PURPOSE)
    generator = torch.Generator().manual_seed(params.seed)
    with torch.random.fork_rng():
        torch.manual_seed(params.seed)
        judge = Judge()
    optimizer = torch.optim.AdamW(judge.parameters(), lr=LR, weight_decay=1e-4, fused=True)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LR, total_steps=steps, pct_start=0.1)
    judge.train()
    for _ in range(steps):
        batch = torch.randint(0, len(x), (BATCH,), generator=generator)
        # generated samples are a little noisy and soft: light noise and a random blur make the judge robust
        noise = (
            0.05 * torch.rand(BATCH, 1, 1, 1, generator=generator) * torch.randn(x[batch].shape, generator=generator)
        )
        pixels = x[batch] + noise
        soft = F.avg_pool2d(F.pad(pixels, (1, 1, 1, 1), mode="replicate"), 3, 1) * 0.5 + pixels * 0.5
        blur = torch.rand(BATCH, generator=generator) < 0.3
        pixels = torch.where(blur[:, None, None, None], soft, pixels).clamp(0, 1)
        loss = sum(F.cross_entropy(logits, y[batch, k]) for k, logits in enumerate(judge(pixels)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    judge.eval()
    held_x, held_y = judge_images(params, 1000, exclude, HELDOUT_PURPOSE)
    correct = predict(judge, held_x) == held_y
    return judge, {f"{a}_accuracy": float(correct[:, k].float().mean()) for k, a in enumerate(ATTRIBUTES)}


@torch.no_grad()
def predict(judge: Judge, pixels: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """(N, 3) predicted digit, foreground and background colour index for images in [0, 1] of any size."""
    chunks = [to_judge(chunk.cpu()) for chunk in pixels.split(batch_size)]
    return torch.cat([torch.stack([logits.argmax(1) for logits in judge(chunk)], 1) for chunk in chunks])


def caption_labels(captions: Sequence[str]) -> torch.Tensor:
    """(N, 3) digit, foreground and background colour index named by each demo caption; -1 where one is not named."""
    names, rows = list(COLORS), []
    for caption in captions:
        digit, _ = parse_caption(caption)
        fg, bg = parse_colors(caption)
        rows.append([int(digit) if digit else -1, names.index(fg) if fg else -1, names.index(bg) if bg else -1])
    return torch.tensor(rows)


def judge_scores(judge: Judge, images: torch.Tensor, captions: Sequence[str]) -> dict[str, float]:
    """caption_accuracy (digit, foreground and background all as captioned) and each attribute's accuracy."""
    correct = predict(judge, images) == caption_labels(captions)
    return {
        "caption_accuracy": float(correct.all(1).float().mean()),
        **{f"{a}_accuracy": float(correct[:, k].float().mean()) for k, a in enumerate(ATTRIBUTES)},
    }
