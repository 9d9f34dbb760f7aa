"""Drawing the demo's images: colours, background textures, digits (scikit-learn's handwritten samples and DejaVu
font glyphs), their captions and the web's alt text. Every function takes the numpy Generator it draws from."""

from __future__ import annotations

import functools
import io
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLORS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (240, 215, 40),
    "purple": (135, 60, 175),
    "orange": (245, 135, 30),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
# Foreground/background pairs far enough apart in RGB that the digit stays legible (red on orange is not).
COLOR_PAIRS = [
    (fg, bg)
    for fg in COLORS
    for bg in COLORS
    if fg != bg and np.linalg.norm(np.subtract(COLORS[fg], COLORS[bg])) >= 170
]
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SEED_TEXTURES = ("plain", "striped", "dotted", "checkered", "gradient")
WEB_TEXTURES = SEED_TEXTURES + ("diagonal", "noisy")  # the web also has textures the seed never shows


ADJECTIVE = {
    "plain": "plain",
    "striped": "striped",
    "dotted": "dotted",
    "checkered": "checkered",
    "gradient": "fading",
    "diagonal": "diagonally striped",
    "noisy": "noisy",
}
NOUN = {
    "plain": "plain {bg}",
    "striped": "{bg} stripes",
    "dotted": "{bg} dots",
    "checkered": "{bg} checks",
    "gradient": "a {bg} gradient",
    "diagonal": "diagonal {bg} stripes",
    "noisy": "noisy {bg}",
}
# Seed captions: the digit is the first digit token and the foreground the first colour word (parse_caption).
CAPTIONS = (
    "{article} {fg} {digit} on a {adjective} {bg} background",
    "digit {word} in {fg} over {noun}",
    "the number {digit}, {fg} on {noun}",
)
DIGIT_TOKENS = {**{str(d): str(d) for d in range(10)}, **{w: str(d) for d, w in enumerate(DIGIT_WORDS)}}
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
LETTERS = "ACEFHKMNPRTUVWXY"
WORDS = ("sale", "cat", "hello", "new", "WOW", "tree", "map", "OK")


def captions(rng: np.random.Generator, digit: str, fg: str, bg: str, texture: str) -> list[str]:
    """Two or three of the CAPTIONS templates, each naming the digit, its colour and the background."""
    words = {
        "fg": fg,
        "bg": bg,
        "digit": digit,
        "word": DIGIT_WORDS[int(digit)],
        "adjective": ADJECTIVE[texture],
        "article": "an" if fg[0] in "aeiou" else "a",
        "noun": NOUN[texture].format(bg=bg),
    }
    chosen = sorted(rng.choice(len(CAPTIONS), size=int(rng.integers(2, 4)), replace=False))
    return [CAPTIONS[c].format(**words) for c in chosen]


def parse_caption(caption: str) -> tuple[str | None, str | None]:
    """(digit, foreground colour) named by a demo caption, or None where it names none."""
    tokens = re.findall(r"[a-z]+|\d", caption.lower())
    digit = next((DIGIT_TOKENS[t] for t in tokens if t in DIGIT_TOKENS), None)
    color = next((t for t in tokens if t in COLORS), None)
    return digit, color


def parse_colors(caption: str) -> tuple[str | None, str | None]:
    """(foreground, background) colour named by a demo caption: its first and second colour words."""
    colors = [t for t in re.findall(r"[a-z]+", caption.lower()) if t in COLORS]
    return (colors[0] if colors else None), (colors[1] if len(colors) > 1 else None)


def digit_mask(digit: np.ndarray, size: int) -> np.ndarray:
    """A load_digits 8x8 sample upscaled smoothly, its strokes pushed to full opacity."""
    small = Image.fromarray(np.uint8(np.round(digit * 255 / 16)))
    soft = np.asarray(small.resize((size, size), Image.BICUBIC), np.float32) / 255
    return np.clip((soft - 0.15) / 0.5, 0, 1)


def shade(rgb: np.ndarray) -> np.ndarray:
    """The texture's second tone: the background colour moved towards white, or black for light colours."""
    luminance = rgb @ np.array([0.299, 0.587, 0.114])
    target = 0.0 if luminance > 128 else 255.0
    return rgb * 0.6 + target * 0.4


def draw_texture(name: str, bg: str, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    base = np.array(COLORS[bg], np.float32)
    y, x = np.mgrid[0:height, 0:width]
    half = max(2, int(round(min(width, height) * rng.uniform(0.08, 0.15))))
    vertical = rng.random() < 0.5
    if name in ("plain", "noisy"):
        tone = np.zeros((height, width))
    elif name == "striped":
        tone = ((x if vertical else y) // half) % 2
    elif name == "diagonal":
        tone = ((x + (y if vertical else -y)) // half) % 2
    elif name == "checkered":
        tone = (x // half + y // half) % 2
    elif name == "dotted":
        period = 2 * half
        dy, dx = y % period - period / 2 + 0.5, x % period - period / 2 + 0.5
        tone = (dx**2 + dy**2) <= (period * 0.3) ** 2
    elif name == "gradient":
        tone = x / max(1, width - 1) if vertical else y / max(1, height - 1)
    else:
        raise ValueError(f"unknown texture {name}")
    tone = np.asarray(tone, np.float32)[..., None]
    image = base * (1 - tone) + shade(base) * tone
    if name == "noisy":
        image = image + rng.normal(0, 22, image.shape)
    return image


def compose(mask: np.ndarray, fg: str, background: np.ndarray) -> np.ndarray:
    alpha = mask[..., None]
    return to_uint8(background * (1 - alpha) + np.array(COLORS[fg], np.float32) * alpha)


def to_uint8(image: np.ndarray) -> np.ndarray:
    return np.uint8(np.clip(np.round(image), 0, 255))


def encode(pixels: np.ndarray, fmt: str, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(pixels, "RGB")
    if fmt == "png":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@functools.cache
def font_faces() -> tuple[str, ...]:
    """DejaVu faces when the system has them (varied glyphs); Pillow's bundled font otherwise."""
    faces = sorted(p.name for p in FONT_DIR.glob("DejaVu*.ttf") if "ExtraLight" not in p.name and "Math" not in p.name)
    return tuple(faces) or ("default",)


@functools.cache
def load_font(face: str, size: int) -> ImageFont.FreeTypeFont:
    if face == "default":
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(str(FONT_DIR / face), size)


def glyph_mask(rng: np.random.Generator, text: str, width: int, height: int, face: str) -> np.ndarray:
    """`text` in `face` at a random size, place and slant."""
    layer = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(layer)
    size = max(8, int(min(width, height) * rng.uniform(0.65, 1.1)))
    stroke = int(rng.integers(0, 2))
    while True:
        font = load_font(face, size)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font, stroke_width=stroke)
        if (right - left <= width and bottom - top <= height) or size <= 8:
            break
        size = max(8, int(size * 0.85))
    x = int(rng.integers(0, max(1, width - (right - left) + 1))) - left
    y = int(rng.integers(0, max(1, height - (bottom - top) + 1))) - top
    draw.text((x, y), text, fill=255, font=font, stroke_width=stroke, stroke_fill=255)
    centre = (x + (left + right) / 2, y + (top + bottom) / 2)
    layer = layer.rotate(float(rng.uniform(-20, 20)), resample=Image.BICUBIC, center=centre)
    return np.asarray(layer, np.float32) / 255


def sample_mask(rng: np.random.Generator, sample: np.ndarray, width: int, height: int) -> np.ndarray:
    """A load_digits sample at another size, place and slant than in the seed."""
    side = max(8, int(min(width, height) * rng.uniform(0.55, 0.9)))
    glyph = Image.fromarray(np.uint8(digit_mask(sample, side) * 255))
    layer = Image.new("L", (width, height), 0)
    x, y = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
    layer.paste(glyph, (x, y))
    layer = layer.rotate(float(rng.uniform(-20, 20)), resample=Image.BICUBIC, center=(x + side / 2, y + side / 2))
    return np.asarray(layer, np.float32) / 255


def web_size(rng: np.random.Generator) -> tuple[int, int]:
    side = int(rng.integers(40, 97))
    return (side, side) if rng.random() < 0.65 else (side, int(rng.integers(40, 97)))


def web_format(rng: np.random.Generator) -> tuple[str, int]:
    return ("jpg", int(rng.integers(70, 96))) if rng.random() < 0.6 else ("png", 0)


def alt_text(rng: np.random.Generator, digit: str, fg: str | None, bg: str | None, texture: str | None) -> str:
    """Alt text as the web writes it: sometimes descriptive, often not, and about the query, not the image."""
    fg = fg or COLOR_PAIRS[rng.integers(len(COLOR_PAIRS))][0]
    word = DIGIT_WORDS[int(digit)]
    templates = [
        f"{fg} {word} on {(NOUN.get(texture or '', '{bg}')).format(bg=bg or 'white')}",
        f"IMG_{int(rng.integers(1000, 10000))}.jpg",
        f"digit {digit} wallpaper",
        "",
        f"number {digit} clipart",
        f"a {fg} {digit} on a {bg or 'white'} background",
        f"{word} - stock photo",
        f"printable {word} worksheet for kids",
        f"Free download: {fg} digit {digit} HD",
    ]
    return templates[int(rng.integers(len(templates)))]
