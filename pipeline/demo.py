"""The embedded demo (DESIGN.md "Embedded demo"): coloured digits as the seed set, and a synthetic web of
file:// URLs for the later stages to crawl, both generated from params alone so the pipeline runs offline.

Every random draw comes from a numpy Generator seeded by (params.seed, purpose, index), so the same params give
byte-identical files on one machine. Across machines the JPEG encoder and the fonts found may differ.
The web's ground truth (truth.parquet) is for tests and bench/ only: no stage reads it.
"""

from __future__ import annotations

import csv
import functools
import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from dextra.pipeline.params import Params

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

# Kinds of synthetic web URL and their rough shares; in_domain takes whatever the others leave.
KIND_SHARES = {
    "in_domain": 0.50,
    "wrong_class": 0.10,
    "out_of_domain": 0.15,
    "duplicate_exact": 0.05,
    "duplicate_near": 0.05,
    "leak": 0.05,
    "dead": 0.03,
    "corrupt": 0.03,
}
KINDS = tuple(KIND_SHARES)
DUPLICATE_KINDS = ("duplicate_exact", "duplicate_near")

TRUTH_SCHEMA = pa.schema(
    [
        pa.field("url", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),  # relative to the demo_web folder
        pa.field("kind", pa.string(), nullable=False),
        pa.field("query_digit", pa.string(), nullable=False),
        pa.field("true_digit", pa.string()),  # the digit drawn; null when there is none
        pa.field("fg_color", pa.string()),
        pa.field("bg_color", pa.string()),
        pa.field("bg_texture", pa.string()),
        pa.field(
            "style", pa.string(), nullable=False
        ),  # how it was drawn: font:<name>, digits:<index>, ood:<variant>, ...
        pa.field("transform", pa.string()),  # leak and duplicate_near: the edits applied, in order
        pa.field("leak_of", pa.string()),  # seed test id
        pa.field("duplicate_of", pa.string()),  # url of the original
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
    ]
)

_ADJECTIVE = {
    "plain": "plain",
    "striped": "striped",
    "dotted": "dotted",
    "checkered": "checkered",
    "gradient": "fading",
}
_NOUN = {
    "plain": "plain {bg}",
    "striped": "{bg} stripes",
    "dotted": "{bg} dots",
    "checkered": "{bg} checks",
    "gradient": "a {bg} gradient",
    "diagonal": "diagonal {bg} stripes",
    "noisy": "noisy {bg}",
}
# Seed captions: the digit is the first digit token and the foreground the first colour word (parse_caption).
_CAPTIONS = (
    "{article} {fg} {digit} on a {adjective} {bg} background",
    "digit {word} in {fg} over {noun}",
    "the number {digit}, {fg} on {noun}",
)
_DIGIT_TOKENS = {**{str(d): str(d) for d in range(10)}, **{w: str(d) for d, w in enumerate(DIGIT_WORDS)}}
_FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
_LETTERS = "ACEFHKMNPRTUVWXY"
_WORDS = ("sale", "cat", "hello", "new", "WOW", "tree", "map", "OK")


def parse_caption(caption: str) -> tuple[str | None, str | None]:
    """(digit, foreground colour) named by a demo caption, or None where it names none."""
    tokens = re.findall(r"[a-z]+|\d", caption.lower())
    digit = next((_DIGIT_TOKENS[t] for t in tokens if t in _DIGIT_TOKENS), None)
    color = next((t for t in tokens if t in COLORS), None)
    return digit, color


def kind_counts(n_web: int) -> dict[str, int]:
    counts = {kind: max(1, round(share * n_web)) for kind, share in KIND_SHARES.items() if kind != "in_domain"}
    return {"in_domain": n_web - sum(counts.values()), **counts}


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
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images, data.target


def _seed_order(params: Params) -> tuple[np.ndarray, list[int]]:
    """Which load_digits samples the seed uses, and the rest (the web draws some of its digits from those)."""
    order = np.random.default_rng([params.seed, 0]).permutation(len(_digits()[1]))
    return order[: params.demo.n_seed], sorted(order[params.demo.n_seed :].tolist())


def seed_images(params: Params) -> list[SeedImage]:
    images, target = _digits()
    size = params.demo.image_size
    result = []
    for i, index in enumerate(_seed_order(params)[0]):
        rng = np.random.default_rng([params.seed, 1, i])
        fg, bg = COLOR_PAIRS[rng.integers(len(COLOR_PAIRS))]
        texture = SEED_TEXTURES[rng.integers(len(SEED_TEXTURES))]
        mask = _digit_mask(images[index], size)
        pixels = _compose(mask, fg, _texture(texture, bg, size, size, rng))
        digit = str(target[index])
        words = {
            "fg": fg,
            "bg": bg,
            "digit": digit,
            "word": DIGIT_WORDS[int(digit)],
            "adjective": _ADJECTIVE[texture],
            "article": "an" if fg[0] in "aeiou" else "a",
        }
        words["noun"] = _NOUN[texture].format(bg=bg)
        chosen = sorted(rng.choice(len(_CAPTIONS), size=int(rng.integers(2, 4)), replace=False))
        captions = [_CAPTIONS[c].format(**words) for c in chosen]
        result.append(SeedImage(f"demo-{i:05d}", digit, fg, bg, texture, captions, pixels, _encode(pixels, "png")))
    return result


def _digit_mask(digit: np.ndarray, size: int) -> np.ndarray:
    """A load_digits 8x8 sample upscaled smoothly, its strokes pushed to full opacity."""
    small = Image.fromarray(np.uint8(np.round(digit * 255 / 16)))
    soft = np.asarray(small.resize((size, size), Image.BICUBIC), np.float32) / 255
    return np.clip((soft - 0.15) / 0.5, 0, 1)


def _shade(rgb: np.ndarray) -> np.ndarray:
    """The texture's second tone: the background colour moved towards white, or black for light colours."""
    luminance = rgb @ np.array([0.299, 0.587, 0.114])
    target = 0.0 if luminance > 128 else 255.0
    return rgb * 0.6 + target * 0.4


def _texture(name: str, bg: str, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
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
    image = base * (1 - tone) + _shade(base) * tone
    if name == "noisy":
        image = image + rng.normal(0, 22, image.shape)
    return image


def _compose(mask: np.ndarray, fg: str, background: np.ndarray) -> np.ndarray:
    alpha = mask[..., None]
    return _to_uint8(background * (1 - alpha) + np.array(COLORS[fg], np.float32) * alpha)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.uint8(np.clip(np.round(image), 0, 255))


def _encode(pixels: np.ndarray, fmt: str, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(pixels, "RGB")
    if fmt == "png":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@functools.cache
def _fonts() -> tuple[str, ...]:
    """DejaVu faces when the system has them (varied glyphs); Pillow's bundled font otherwise."""
    faces = sorted(p.name for p in _FONT_DIR.glob("DejaVu*.ttf") if "ExtraLight" not in p.name and "Math" not in p.name)
    return tuple(faces) or ("default",)


@functools.cache
def _font(face: str, size: int) -> ImageFont.FreeTypeFont:
    if face == "default":
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(str(_FONT_DIR / face), size)


def _glyph_mask(rng: np.random.Generator, text: str, width: int, height: int, face: str) -> np.ndarray:
    """`text` in `face` at a random size, place and slant."""
    layer = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(layer)
    size = max(8, int(min(width, height) * rng.uniform(0.65, 1.1)))
    stroke = int(rng.integers(0, 2))
    while True:
        font = _font(face, size)
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


def _sample_mask(rng: np.random.Generator, sample: np.ndarray, width: int, height: int) -> np.ndarray:
    """A load_digits sample at another size, place and slant than in the seed."""
    side = max(8, int(min(width, height) * rng.uniform(0.55, 0.9)))
    glyph = Image.fromarray(np.uint8(_digit_mask(sample, side) * 255))
    layer = Image.new("L", (width, height), 0)
    x, y = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
    layer.paste(glyph, (x, y))
    layer = layer.rotate(float(rng.uniform(-20, 20)), resample=Image.BICUBIC, center=(x + side / 2, y + side / 2))
    return np.asarray(layer, np.float32) / 255


def _web_size(rng: np.random.Generator) -> tuple[int, int]:
    side = int(rng.integers(40, 97))
    return (side, side) if rng.random() < 0.65 else (side, int(rng.integers(40, 97)))


def _web_format(rng: np.random.Generator) -> tuple[str, int]:
    return ("jpg", int(rng.integers(70, 96))) if rng.random() < 0.6 else ("png", 0)


def _alt_text(rng: np.random.Generator, digit: str, fg: str | None, bg: str | None, texture: str | None) -> str:
    """Alt text as the web writes it: sometimes descriptive, often not, and about the query, not the image."""
    fg = fg or COLOR_PAIRS[rng.integers(len(COLOR_PAIRS))][0]
    word = DIGIT_WORDS[int(digit)]
    templates = [
        f"{fg} {word} on {(_NOUN.get(texture or '', '{bg}')).format(bg=bg or 'white')}",
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


class _Web:
    """Builds the synthetic web row by row; each row draws from its own seeded generator."""

    def __init__(self, params: Params, seed: list[SeedImage], test_ids: set[str], url_folder: Path):
        self.params, self.url_folder = params, url_folder
        self.tests = [s for s in seed if s.id in test_ids]
        target = _digits()[1]
        self.spare = {d: [i for i in _seed_order(params)[1] if target[i] == d] for d in range(10)}
        self.leak_order = np.random.default_rng([params.seed, 5]).permutation(len(self.tests))
        self.rows: dict[int, dict] = {}
        self.files: dict[int, bytes] = {}
        self.text: dict[int, str] = {}

    def rng(self, purpose: int, index: int) -> np.random.Generator:
        return np.random.default_rng([self.params.seed, purpose, index])

    def add(self, index: int, kind: str, rng: np.random.Generator, query: str, data: bytes | None, ext: str, **truth):
        path = f"images/web-{index:05d}.{ext}"
        self.rows[index] = {
            "url": (self.url_folder / path).as_uri(),
            "path": path,
            "kind": kind,
            "query_digit": query,
            **{f.name: None for f in TRUTH_SCHEMA if f.name not in ("url", "path", "kind", "query_digit")},
            **truth,
        }
        if data is not None:
            self.files[index] = data
        row = self.rows[index]
        self.text[index] = _alt_text(rng, query, row["fg_color"], row["bg_color"], row["bg_texture"])

    def digit_image(self, rng: np.random.Generator, digit: str) -> tuple[np.ndarray, dict]:
        width, height = _web_size(rng)
        fg, bg = COLOR_PAIRS[rng.integers(len(COLOR_PAIRS))]
        texture = WEB_TEXTURES[rng.integers(len(WEB_TEXTURES))]
        spare = self.spare[int(digit)]
        if spare and rng.random() < 0.3:
            sample = spare[rng.integers(len(spare))]
            mask, style = _sample_mask(rng, _digits()[0][sample], width, height), f"digits:{sample}"
        else:
            face = _fonts()[rng.integers(len(_fonts()))]
            mask, style = _glyph_mask(rng, digit, width, height, face), f"font:{face.removesuffix('.ttf')}"
        pixels = _compose(mask, fg, _texture(texture, bg, width, height, rng))
        return pixels, {"true_digit": digit, "fg_color": fg, "bg_color": bg, "bg_texture": texture, "style": style}

    def add_image(self, index: int, kind: str, rng: np.random.Generator, query: str, pixels: np.ndarray, **truth):
        ext, quality = _web_format(rng)
        height, width = pixels.shape[:2]
        self.add(index, kind, rng, query, _encode(pixels, ext, quality), ext, width=width, height=height, **truth)

    def in_domain(self, index: int, kind: str) -> None:
        rng = self.rng(3, index)
        query = str(rng.integers(10))
        digit = query if kind == "in_domain" else str((int(query) + rng.integers(1, 10)) % 10)
        pixels, truth = self.digit_image(rng, digit)
        self.add_image(index, kind, rng, query, pixels, **truth)

    def out_of_domain(self, index: int) -> None:
        rng = self.rng(4, index)
        query = str(rng.integers(10))
        width, height = _web_size(rng)
        fg, bg = COLOR_PAIRS[rng.integers(len(COLOR_PAIRS))]
        variant = ("shapes", "noise", "gradient", "letters", "stripes")[rng.integers(5)]
        truth = {"fg_color": fg, "bg_color": bg, "bg_texture": "plain", "style": f"ood:{variant}"}
        if variant == "noise":
            cells = rng.integers(0, 256, (max(2, height // 6), max(2, width // 6), 3), dtype=np.uint8)
            pixels = np.asarray(Image.fromarray(cells, "RGB").resize((width, height), Image.BILINEAR))
            truth.update(fg_color=None, bg_color=None, bg_texture=None)
        elif variant == "gradient":
            pixels = _to_uint8(_texture("gradient", bg, width, height, rng))
            truth.update(fg_color=None, bg_texture="gradient")
        elif variant == "stripes":
            texture = ("striped", "checkered", "dotted", "diagonal")[rng.integers(4)]
            pixels = _to_uint8(_texture(texture, bg, width, height, rng))
            truth.update(fg_color=None, bg_texture=texture)
        elif variant == "letters":
            texture = WEB_TEXTURES[rng.integers(len(WEB_TEXTURES))]
            text = _LETTERS[rng.integers(len(_LETTERS))] if rng.random() < 0.6 else _WORDS[rng.integers(len(_WORDS))]
            mask = _glyph_mask(rng, text, width, height, _fonts()[rng.integers(len(_fonts()))])
            pixels = _compose(mask, fg, _texture(texture, bg, width, height, rng))
            truth.update(bg_texture=texture)
        else:
            image = Image.fromarray(_to_uint8(_texture("plain", bg, width, height, rng)), "RGB")
            draw = ImageDraw.Draw(image)
            for n in range(int(rng.integers(1, 5))):
                color = COLORS[fg] if n == 0 else COLORS[list(COLORS)[rng.integers(len(COLORS))]]
                x0, y0 = int(rng.integers(0, width - 8)), int(rng.integers(0, height - 8))
                box = (x0, y0, int(rng.integers(x0 + 6, width)), int(rng.integers(y0 + 6, height)))
                shape = rng.integers(3)
                if shape == 0:
                    draw.ellipse(box, fill=color)
                elif shape == 1:
                    draw.rectangle(box, fill=color)
                else:
                    draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=color)
            pixels = np.asarray(image)
        self.add_image(index, "out_of_domain", rng, query, pixels, **truth)

    def leak(self, index: int, ordinal: int) -> None:
        """A near-duplicate of a seed test image, from 2-4 of: crop, flip, colour shift, resize, JPEG."""
        rng = self.rng(5, index)
        source = self.tests[self.leak_order[ordinal % len(self.tests)]]
        chosen = set(rng.choice(["crop", "hflip", "color_shift", "jpeg"], size=int(rng.integers(1, 4)), replace=False))
        image, steps = Image.fromarray(source.pixels, "RGB"), []
        if "crop" in chosen:
            w, h = image.size
            l, t, r, b = (int(v) for v in rng.integers(1, max(2, w // 10) + 1, 4))
            image, steps = image.crop((l, t, w - r, h - b)), steps + ["crop"]
        if "hflip" in chosen:
            image, steps = image.transpose(Image.FLIP_LEFT_RIGHT), steps + ["hflip"]
        if "color_shift" in chosen:
            shifted = np.asarray(image, np.int16) + rng.integers(-30, 31, 3)
            image, steps = Image.fromarray(np.uint8(np.clip(shifted, 0, 255)), "RGB"), steps + ["color_shift"]
        side = int(rng.integers(40, 97))
        pixels, steps = np.asarray(image.resize((side, side), Image.BICUBIC)), steps + ["resize"]
        ext = "jpg" if "jpeg" in chosen else "png"
        steps += ["jpeg"] if ext == "jpg" else []
        truth = {"true_digit": source.digit, "fg_color": source.fg, "bg_color": source.bg, "bg_texture": source.texture}
        data = _encode(pixels, ext, int(rng.integers(55, 91)))
        self.add(
            index,
            "leak",
            rng,
            source.digit,
            data,
            ext,
            width=side,
            height=side,
            style="seed",
            transform="+".join(steps),
            leak_of=source.id,
            **truth,
        )

    def broken(self, index: int, kind: str, ordinal: int) -> None:
        rng = self.rng(6, index)
        query = str(rng.integers(10))
        if kind == "dead":
            self.add(index, kind, rng, query, None, "jpg", style="dead")
            return
        variant = ("truncated", "random_bytes", "empty", "html")[ordinal % 4]
        if variant == "truncated":
            jpeg = _encode(self.digit_image(rng, query)[0], "jpg", 90)
            data = jpeg[: int(len(jpeg) * rng.uniform(0.15, 0.5))]
        elif variant == "random_bytes":
            data = rng.integers(0, 256, int(rng.integers(200, 4000)), dtype=np.uint8).tobytes()
        elif variant == "empty":
            data = b""
        else:
            data = b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"
        self.add(index, kind, rng, query, data, "jpg", style=f"corrupt:{variant}")

    def duplicate(self, index: int, kind: str, originals: dict[str, list[int]]) -> None:
        """A copy of an earlier image (mostly an in-domain one) under a new URL: same bytes, or lightly edited."""
        rng = self.rng(7, index)
        pool = originals["in_domain"] if rng.random() < 0.8 or not originals["other"] else originals["other"]
        chosen_index = pool[rng.integers(len(pool))]
        original, source = self.rows[chosen_index], self.files[chosen_index]
        inherited = {k: original[k] for k in ("true_digit", "fg_color", "bg_color", "bg_texture", "style")}
        ext = original["path"].rsplit(".", 1)[1]
        if kind == "duplicate_exact":
            self.add(
                index,
                kind,
                rng,
                original["query_digit"],
                source,
                ext,
                width=original["width"],
                height=original["height"],
                duplicate_of=original["url"],
                **inherited,
            )
            return
        image, steps = Image.open(io.BytesIO(source)).convert("RGB"), []
        chosen = set(rng.choice(["resize", "crop"], size=int(rng.integers(1, 3)), replace=False))
        if "crop" in chosen:
            w, h = image.size
            l, t, r, b = (int(v) for v in rng.integers(0, max(1, int(min(w, h) * 0.08)) + 1, 4))
            image, steps = image.crop((l, t, w - max(r, 1), h - b)), steps + ["crop"]
        if "resize" in chosen:
            scale = rng.uniform(0.75, 1.3)
            size = (max(24, round(image.width * scale)), max(24, round(image.height * scale)))
            image, steps = image.resize(size, Image.BICUBIC), steps + ["resize"]
        ext, quality = _web_format(rng)
        steps.append("jpeg" if ext == "jpg" else "png")
        self.add(
            index,
            kind,
            rng,
            original["query_digit"],
            _encode(np.asarray(image), ext, quality),
            ext,
            width=image.width,
            height=image.height,
            transform="+".join(steps),
            duplicate_of=original["url"],
            **inherited,
        )


def write_web(
    params: Params, seed: list[SeedImage], test_ids: set[str], folder: Path, url_folder: Path
) -> dict[str, int]:
    """Write the synthetic web into `folder` (images/, urls.csv, truth.parquet), its URLs pointing into
    `url_folder`, where the folder will finally live. Returns the count of each kind."""
    counts = kind_counts(params.demo.n_web)
    kinds = [kind for kind in KINDS for _ in range(counts[kind])]
    kinds = [kinds[i] for i in np.random.default_rng([params.seed, 2]).permutation(len(kinds))]
    web = _Web(params, seed, test_ids, url_folder)
    ordinals = {kind: 0 for kind in KINDS}
    for index, kind in enumerate(kinds):
        if kind in ("in_domain", "wrong_class"):
            web.in_domain(index, kind)
        elif kind == "out_of_domain":
            web.out_of_domain(index)
        elif kind == "leak":
            web.leak(index, ordinals[kind])
        elif kind in ("dead", "corrupt"):
            web.broken(index, kind, ordinals[kind])
        ordinals[kind] += 1
    originals = {
        "in_domain": [i for i, k in enumerate(kinds) if k == "in_domain"],
        "other": [i for i, k in enumerate(kinds) if k in ("wrong_class", "out_of_domain")],
    }
    for index, kind in enumerate(kinds):
        if kind in DUPLICATE_KINDS:
            web.duplicate(index, kind, originals)

    (folder / "images").mkdir(parents=True)
    for index, data in sorted(web.files.items()):
        (folder / web.rows[index]["path"]).write_bytes(data)
    with (folder / "urls.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["url", "text", "query", "class"])
        for index in range(len(kinds)):
            row = web.rows[index]
            writer.writerow([row["url"], web.text[index], f"digit {row['query_digit']}", row["query_digit"]])
    rows = [web.rows[index] for index in range(len(kinds))]
    pq.write_table(pa.Table.from_pylist(rows, schema=TRUTH_SCHEMA), folder / "truth.parquet", compression="zstd")
    return counts
