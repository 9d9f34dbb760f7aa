"""The demo's CLIP corpus: what stands in for the web-scale pretraining of a real CLIP (which no offline demo can
download). Captioned digits in every style the web shows (seed-like handwriting, placed and slanted handwriting,
DejaVu font glyphs, every texture), drawn from load_digits samples that neither the seed nor the web uses, so the
CLIP meets no seed or crawl image before it is adapted to seed train."""

from __future__ import annotations

import numpy as np
from PIL import Image

from dextra.pipeline.demo.draw import (
    COLOR_PAIRS,
    SEED_TEXTURES,
    WEB_TEXTURES,
    captions,
    compose,
    digit_mask,
    draw_texture,
    encode,
    font_faces,
    glyph_mask,
    sample_mask,
)
from dextra.pipeline.demo.seed import digits, seed_order
from dextra.pipeline.importers.records import shard_row
from dextra.pipeline.params import Params

CORPUS_PURPOSE = 8  # a random stream of its own (web.py uses 2 to 7, zero_shot.py 9, the judge 10 and 11)
STYLES = ("seed", "handwriting", "font")


def corpus_rows(params: Params) -> list[dict]:
    """params.demo.n_corpus shard rows (split "corpus", class = the digit), a third in each style, from load_digits
    samples that neither the seed nor the web uses."""
    rows, pool = [], seed_order(params)[2]
    for i in range(params.demo.n_corpus):
        rng = np.random.default_rng([params.seed, CORPUS_PURPOSE, i])
        style = STYLES[i % len(STYLES)]
        digit, fg, bg, texture, pixels = draw_styled(rng, style, pool, params.demo.image_size)
        texts = captions(rng, digit, fg, bg, texture)
        rows.append(
            shard_row(f"corpus-{i:05d}", encode(pixels, "png"), pixels.shape[1::-1], texts, "corpus", digit, "demo")
        )
    return rows


def draw_styled(
    rng: np.random.Generator, style: str, pool: list[int], size: int
) -> tuple[str, str, str, str, np.ndarray]:
    """(digit, fg, bg, texture, uint8 pixels) of one digit drawn in `style` from the load_digits samples in `pool`,
    at a web image's size and resized to `size` as fetch resizes the web's (seed style: drawn at `size`)."""
    images, target = digits()
    sample = pool[rng.integers(len(pool))]
    digit = str(target[sample])
    fg, bg = COLOR_PAIRS[rng.integers(len(COLOR_PAIRS))]
    side = size if style == "seed" else int(rng.integers(size, 3 * size + 1))
    textures = SEED_TEXTURES if style == "seed" else WEB_TEXTURES
    texture = textures[rng.integers(len(textures))]
    if style == "seed":
        mask = digit_mask(images[sample], side)
    elif style == "handwriting":
        mask = sample_mask(rng, images[sample], side, side)
    else:
        mask = glyph_mask(rng, digit, side, side, font_faces()[rng.integers(len(font_faces()))])
    pixels = compose(mask, fg, draw_texture(texture, bg, side, side, rng))
    if side != size:
        pixels = np.asarray(Image.fromarray(pixels, "RGB").resize((size, size), Image.BICUBIC, reducing_gap=None))
    return digit, fg, bg, texture, pixels
