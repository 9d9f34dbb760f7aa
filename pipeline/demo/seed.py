"""The demo's seed set: scikit-learn's handwritten digits, coloured and upscaled on textured backgrounds, with
captions that name the digit, its colour and the background."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from dextra.pipeline.demo.draw import (
    COLOR_PAIRS,
    SEED_TEXTURES,
    captions,
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


def seed_order(params: Params) -> tuple[np.ndarray, list[int], list[int]]:
    """Which load_digits samples the seed uses, and how the rest is shared: half for the web's handwritten digits,
    half for the CLIP corpus, so that the corpus shows neither a seed nor a web image."""
    order = np.random.default_rng([params.seed, 0]).permutation(len(digits()[1]))
    rest = order[params.demo.n_seed :]
    return order[: params.demo.n_seed], sorted(rest[::2].tolist()), sorted(rest[1::2].tolist())


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
        texts = captions(rng, digit, fg, bg, texture)
        result.append(SeedImage(f"demo-{i:05d}", digit, fg, bg, texture, texts, pixels, encode(pixels, "png")))
    return result
