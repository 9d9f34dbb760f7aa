"""The demo CLIP's zero-shot digit accuracy on the web's styles, for metrics/clip.json: how much of the web the class
detector and the extrapolated captions can read."""

from __future__ import annotations

import numpy as np
import torch

from dextra.filter.clip import ClipBundle
from dextra.pipeline.demo.corpus import STYLES, draw_styled
from dextra.pipeline.demo.draw import COLOR_PAIRS
from dextra.pipeline.demo.seed import seed_order
from dextra.pipeline.params import Params

ZERO_SHOT_PURPOSE = 9  # a random stream of its own (web.py uses 2 to 7, corpus.py 8, the judge 10 and 11)
ZERO_SHOT_IMAGES = 300  # per style


def zero_shot_digits(bundle: ClipBundle, params: Params) -> dict[str, float]:
    """The CLIP's zero-shot digit accuracy per web style on freshly drawn images (handwriting from the web's share of
    load_digits, font glyphs): each image's digit is the one whose prompt, averaged over every colour pair, is
    nearest. What the class detector and the extrapolated captions can read of the web."""
    prompts = []
    for digit in range(10):
        texts = bundle.encode_texts([f"the number {digit}, {fg} on plain {bg}" for fg, bg in COLOR_PAIRS]).mean(0)
        prompts.append(texts / np.linalg.norm(texts))
    out, pool = {}, seed_order(params)[1]
    for style in STYLES[1:]:
        drawn = [
            draw_styled(np.random.default_rng([params.seed, ZERO_SHOT_PURPOSE, i]), style, pool, params.demo.image_size)
            for i in range(ZERO_SHOT_IMAGES)
        ]
        pixels = torch.from_numpy(np.stack([d[4] for d in drawn])).permute(0, 3, 1, 2).float() / 255
        predicted = (bundle.encode_pixels(pixels).cpu().numpy() @ np.stack(prompts).T).argmax(1)
        out[style] = float(np.mean(predicted == np.array([int(d[0]) for d in drawn])))
    return out
