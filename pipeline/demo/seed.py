"""The demo's seed set: scikit-learn's handwritten digits, coloured and upscaled on textured backgrounds, with
captions that name the digit, its colour and the background."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from dextra.pipeline.demo.draw import (
    ADJECTIVE,
    CAPTIONS,
    COLOR_PAIRS,
    DIGIT_WORDS,
    NOUN,
    SEED_TEXTURES,
    compose,
    digit_mask,
    draw_texture,
    encode,
)
from dextra.pipeline.params import Params


@dataclass(frozen=True)
class SeedImage:
    id: str
    digit: str
    fg: str
    bg: str
    texture: str
    captions: list[str]
    pixels: np.ndarray  # uint8 RGB
    png: bytes


@functools.cache
def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images, data.target


def seed_order(params: Params) -> tuple[np.ndarray, list[int]]:
    """Which load_digits samples the seed uses, and the rest (the web draws some of its digits from those)."""
    order = np.random.default_rng([params.seed, 0]).permutation(len(digits()[1]))
    return order[: params.demo.n_seed], sorted(order[params.demo.n_seed :].tolist())


def seed_images(params: Params) -> list[SeedImage]:
    images, target = digits()
    size = params.demo.image_size
    result = []
    for i, index in enumerate(seed_order(params)[0]):
        rng = np.random.default_rng([params.seed, 1, i])
        fg, bg = COLOR_PAIRS[rng.integers(len(COLOR_PAIRS))]
        texture = SEED_TEXTURES[rng.integers(len(SEED_TEXTURES))]
        mask = digit_mask(images[index], size)
        pixels = compose(mask, fg, draw_texture(texture, bg, size, size, rng))
        digit = str(target[index])
        words = {
            "fg": fg,
            "bg": bg,
            "digit": digit,
            "word": DIGIT_WORDS[int(digit)],
            "adjective": ADJECTIVE[texture],
            "article": "an" if fg[0] in "aeiou" else "a",
        }
        words["noun"] = NOUN[texture].format(bg=bg)
        chosen = sorted(rng.choice(len(CAPTIONS), size=int(rng.integers(2, 4)), replace=False))
        captions = [CAPTIONS[c].format(**words) for c in chosen]
        result.append(SeedImage(f"demo-{i:05d}", digit, fg, bg, texture, captions, pixels, encode(pixels, "png")))
    return result
