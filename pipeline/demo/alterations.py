"""The kinds of copy the web makes of a picture: crops, rotations and mirroring, padding and letterboxing, caption
bars and overlays, heavy recompression, blur and rescaling, colour changes, and mixes of them. The demo web's leaks
are made with them (web.py), and bench/leak_recall.py measures the leak detector on each family."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

FAMILIES = (
    "crop",
    "rotate",
    "mirror",
    "pad",
    "letterbox",
    "caption_bar",
    "overlay",
    "jpeg",
    "blur",
    "rescale",
    "colour",
    "combined",
)
SINGLE = FAMILIES[:-1]
WEB_SIDE = 96  # copies are made from an upscaled original, as a web page shows a small picture


def _color(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _crop(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Down to half the area, anywhere in the picture, not always square."""
    w, h = image.size
    area = rng.uniform(0.5, 0.8)
    aspect = rng.uniform(0.85, 1.15)
    cw, ch = min(w, round(w * (area * aspect) ** 0.5)), min(h, round(h * (area / aspect) ** 0.5))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return image.crop((left, top, left + cw, top + ch))


def _rotate(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return image.transpose([Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270][
        int(rng.integers(3))
    ])  # fmt: skip


def _mirror(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return ImageOps.mirror(image) if rng.random() < 0.7 else ImageOps.flip(image)


def _pad(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A border of one colour, 5-25% of the side on each side, not always even."""
    w = image.size[0]
    sides = tuple(int(round(w * f)) for f in rng.uniform(0.05, 0.25, 4))
    return ImageOps.expand(image, border=sides, fill=_color(rng))


def _letterbox(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Centred in a 2:1 (or 1:2) frame of black, white or a colour."""
    w, h = image.size
    wide = rng.random() < 0.5
    frame = Image.new("RGB", (2 * w, h) if wide else (w, 2 * h), [(0, 0, 0), (255, 255, 255), _color(rng)][
        int(rng.integers(3))
    ])  # fmt: skip
    frame.paste(image, ((w // 2, 0) if wide else (0, h // 2)))
    return frame


def _caption_bar(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A bar of 15-30% of the height above or below, with text in it."""
    w, h = image.size
    bar = int(round(h * rng.uniform(0.15, 0.3)))
    out = Image.new("RGB", (w, h + bar), (255, 255, 255) if rng.random() < 0.5 else (0, 0, 0))
    below = rng.random() < 0.7
    out.paste(image, (0, 0 if below else bar))
    draw = ImageDraw.Draw(out)
    text_colour = (0, 0, 0) if out.getpixel((0, h if below else 0)) == (255, 255, 255) else (255, 255, 255)
    draw.text((3, (h if below else 0) + bar // 4), "photo by someone " + str(rng.integers(1000)), fill=text_colour)
    return out


def _overlay(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Text, lines or a logo drawn over the picture."""
    image = image.copy()
    draw, (w, h) = ImageDraw.Draw(image), image.size
    kind = ("text", "lines", "logo")[int(rng.integers(3))]
    if kind == "text":
        draw.text((int(w * rng.uniform(0, 0.4)), int(h * rng.uniform(0.6, 0.85))), "(c) site", fill=_color(rng))
    elif kind == "lines":
        width = max(1, w // 48)
        draw.line((0, 0, w, h), fill=_color(rng), width=width)
        draw.line((0, h, w, 0), fill=_color(rng), width=width)
    else:
        side = int(w * rng.uniform(0.12, 0.2))
        left, top = (w - side - 2, h - side - 2) if rng.random() < 0.5 else (2, 2)
        draw.ellipse((left, top, left + side, top + side), fill=_color(rng))
    return image


def _jpeg(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(rng.integers(5, 16)))
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _blur(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(image.size[0] / WEB_SIDE * rng.uniform(1.0, 2.5)))


def _rescale(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Down to a thumbnail and back up, or up to a large picture."""
    w, h = image.size
    if rng.random() < 0.5:
        small = max(12, int(w * rng.uniform(0.2, 0.35)))
        return image.resize((small, max(1, round(h * small / w))), Image.Resampling.BILINEAR).resize((w, h))
    factor = rng.uniform(1.5, 3.0)
    return image.resize((round(w * factor), round(h * factor)), Image.Resampling.BICUBIC)


def _colour(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A hue rotation, a saturation or contrast change, greyscale, or a channel swap."""
    kind = ("hue", "saturation", "grey", "swap")[int(rng.integers(4))]
    if kind == "hue":
        hsv = np.asarray(image.convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(np.int32) + int(rng.integers(40, 216))) % 256
        return Image.fromarray(hsv, "HSV").convert("RGB")
    if kind == "saturation":
        return ImageEnhance.Contrast(ImageEnhance.Color(image).enhance(rng.uniform(0.2, 2.0))).enhance(
            rng.uniform(0.6, 1.4)
        )
    if kind == "grey":
        return ImageOps.grayscale(image).convert("RGB")
    return Image.fromarray(np.asarray(image)[..., rng.permutation(3)])


ALTER = {name: globals()[f"_{name}"] for name in SINGLE}


def alter(pixels: np.ndarray, family: str, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """An altered copy of an RGB picture (uint8) and the alterations applied. The picture is first shown at the
    web's size; `combined` applies three different families in a random order."""
    image = Image.fromarray(pixels, "RGB").resize((WEB_SIDE, WEB_SIDE), Image.Resampling.BICUBIC)
    steps = list(rng.choice(SINGLE, 3, replace=False)) if family == "combined" else [family]
    for step in steps:
        image = ALTER[step](image, rng)
    return np.asarray(image.convert("RGB")), steps
