"""The demo's synthetic web: file:// URLs of in-domain digits drawn differently from the seed, wrong-class and
out-of-domain images, exact and near duplicates, altered copies of seed test images, dead links and corrupt files,
with alt text and the query each was found with. Its ground truth (truth.parquet) is for tests and bench/ only: no
stage reads it."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from dextra.pipeline.demo.alterations import FAMILIES, alter
from dextra.pipeline.demo.draw import (
    COLOR_PAIRS,
    COLORS,
    LETTERS,
    WEB_TEXTURES,
    WORDS,
    alt_text,
    compose,
    digit_mask,
    draw_texture,
    encode,
    font_faces,
    glyph_mask,
    sample_mask,
    to_uint8,
    web_format,
    web_size,
)
from dextra.pipeline.demo.seed import SeedImage, digits, seed_order
from dextra.pipeline.params import Params

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
        ),  # how it was drawn: font:<name>, digits:<index> (framed), placed:<index>, ood:<variant>, ...
        pa.field("transform", pa.string()),  # leak and duplicate_near: the edits applied, in order
        pa.field("leak_of", pa.string()),  # seed test id
        pa.field("duplicate_of", pa.string()),  # url of the original
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
    ]
)


def kind_counts(n_web: int) -> dict[str, int]:
    counts = {kind: max(1, round(share * n_web)) for kind, share in KIND_SHARES.items() if kind != "in_domain"}
    return {"in_domain": n_web - sum(counts.values()), **counts}


class _Web:
    """Builds the synthetic web row by row; each row draws from its own seeded generator."""

    def __init__(self, params: Params, seed: list[SeedImage], test_ids: set[str]):
        self.params = params
        self.tests = [s for s in seed if s.id in test_ids]
        target = digits()[1]
        self.spare = {d: [i for i in seed_order(params)[1] if target[i] == d] for d in range(10)}
        self.leak_order = np.random.default_rng([params.seed, 5]).permutation(len(self.tests))
        self.rows: dict[int, dict] = {}
        self.files: dict[int, bytes] = {}
        self.text: dict[int, str] = {}

    def rng(self, purpose: int, index: int) -> np.random.Generator:
        return np.random.default_rng([self.params.seed, purpose, index])

    def add(self, index: int, kind: str, rng: np.random.Generator, query: str, data: bytes | None, ext: str, **truth):
        path = f"images/web-{index:05d}.{ext}"
        self.rows[index] = {
            "url": path,  # relative to urls.csv: the same URL and url_id in any checkout folder
            "path": path,
            "kind": kind,
            "query_digit": query,
            **{f.name: None for f in TRUTH_SCHEMA if f.name not in ("url", "path", "kind", "query_digit")},
            **truth,
        }
        if data is not None:
            self.files[index] = data
        row = self.rows[index]
        self.text[index] = alt_text(rng, query, row["fg_color"], row["bg_color"], row["bg_texture"])

    def digit_image(self, rng: np.random.Generator, digit: str) -> tuple[np.ndarray, dict]:
        """Half are pictures of a handwritten digit framed as the seed's are (a web search mostly finds pictures of
        its subject), at the web's sizes and formats, from samples the seed never uses: what lets a generator
        pretrained on the web learn shapes that carry over. The rest are placed and slanted handwriting and font
        glyphs, the styles only a web-pretrained CLIP reads."""
        width, height = web_size(rng)
        fg, bg = COLOR_PAIRS[rng.integers(len(COLOR_PAIRS))]
        texture = WEB_TEXTURES[rng.integers(len(WEB_TEXTURES))]
        spare = self.spare[int(digit)]
        choice = rng.random()
        if spare and choice < 0.7:
            sample = spare[rng.integers(len(spare))]
            handwritten = digits()[0][sample]
            if choice < 0.5:
                width = height = min(width, height)
                mask, style = digit_mask(handwritten, width), f"digits:{sample}"
            else:
                mask, style = sample_mask(rng, handwritten, width, height), f"placed:{sample}"
        else:
            face = font_faces()[rng.integers(len(font_faces()))]
            mask, style = glyph_mask(rng, digit, width, height, face), f"font:{face.removesuffix('.ttf')}"
        pixels = compose(mask, fg, draw_texture(texture, bg, width, height, rng))
        return pixels, {"true_digit": digit, "fg_color": fg, "bg_color": bg, "bg_texture": texture, "style": style}

    def add_image(self, index: int, kind: str, rng: np.random.Generator, query: str, pixels: np.ndarray, **truth):
        ext, quality = web_format(rng)
        height, width = pixels.shape[:2]
        self.add(index, kind, rng, query, encode(pixels, ext, quality), ext, width=width, height=height, **truth)

    def in_domain(self, index: int, kind: str) -> None:
        rng = self.rng(3, index)
        query = str(rng.integers(10))
        digit = query if kind == "in_domain" else str((int(query) + rng.integers(1, 10)) % 10)
        pixels, truth = self.digit_image(rng, digit)
        self.add_image(index, kind, rng, query, pixels, **truth)

    def out_of_domain(self, index: int) -> None:
        rng = self.rng(4, index)
        query = str(rng.integers(10))
        width, height = web_size(rng)
        fg, bg = COLOR_PAIRS[rng.integers(len(COLOR_PAIRS))]
        variant = ("shapes", "noise", "gradient", "letters", "stripes")[rng.integers(5)]
        truth = {"fg_color": fg, "bg_color": bg, "bg_texture": "plain", "style": f"ood:{variant}"}
        if variant == "noise":
            cells = rng.integers(0, 256, (max(2, height // 6), max(2, width // 6), 3), dtype=np.uint8)
            pixels = np.asarray(Image.fromarray(cells, "RGB").resize((width, height), Image.BILINEAR))
            truth.update(fg_color=None, bg_color=None, bg_texture=None)
        elif variant == "gradient":
            pixels = to_uint8(draw_texture("gradient", bg, width, height, rng))
            truth.update(fg_color=None, bg_texture="gradient")
        elif variant == "stripes":
            texture = ("striped", "checkered", "dotted", "diagonal")[rng.integers(4)]
            pixels = to_uint8(draw_texture(texture, bg, width, height, rng))
            truth.update(fg_color=None, bg_texture=texture)
        elif variant == "letters":
            texture = WEB_TEXTURES[rng.integers(len(WEB_TEXTURES))]
            text = LETTERS[rng.integers(len(LETTERS))] if rng.random() < 0.6 else WORDS[rng.integers(len(WORDS))]
            mask = glyph_mask(rng, text, width, height, font_faces()[rng.integers(len(font_faces()))])
            pixels = compose(mask, fg, draw_texture(texture, bg, width, height, rng))
            truth.update(bg_texture=texture)
        else:
            image = Image.fromarray(to_uint8(draw_texture("plain", bg, width, height, rng)), "RGB")
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
        """An altered copy of a seed test image, as the web makes them: the alteration families of alterations.py
        in turn (crops, rotations, frames, caption bars, overlays, recompression, blur, rescaling, colour, mixes)."""
        rng = self.rng(5, index)
        source = self.tests[self.leak_order[ordinal % len(self.tests)]]
        pixels, steps = alter(source.pixels, FAMILIES[ordinal % len(FAMILIES)], rng)
        ext, quality = web_format(rng)
        height, width = pixels.shape[:2]
        truth = {"true_digit": source.digit, "fg_color": source.fg, "bg_color": source.bg, "bg_texture": source.texture}
        self.add(
            index,
            "leak",
            rng,
            source.digit,
            encode(pixels, ext, quality),
            ext,
            width=width,
            height=height,
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
            jpeg = encode(self.digit_image(rng, query)[0], "jpg", 90)
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
            left, top, right, bottom = (int(v) for v in rng.integers(0, max(1, int(min(w, h) * 0.08)) + 1, 4))
            image, steps = image.crop((left, top, w - max(right, 1), h - bottom)), steps + ["crop"]
        if "resize" in chosen:
            scale = rng.uniform(0.75, 1.3)
            size = (max(24, round(image.width * scale)), max(24, round(image.height * scale)))
            image, steps = image.resize(size, Image.BICUBIC), steps + ["resize"]
        ext, quality = web_format(rng)
        steps.append("jpeg" if ext == "jpg" else "png")
        self.add(
            index,
            kind,
            rng,
            original["query_digit"],
            encode(np.asarray(image), ext, quality),
            ext,
            width=image.width,
            height=image.height,
            transform="+".join(steps),
            duplicate_of=original["url"],
            **inherited,
        )


def write_web(params: Params, seed: list[SeedImage], test_ids: set[str], folder: Path) -> dict[str, int]:
    """Write the synthetic web into `folder` (images/, urls.csv, truth.parquet). Its URLs are relative references
    (images/web-00042.png), which the `urls` stage resolves against urls.csv's folder: nothing written depends on
    where the checkout is. Returns the count of each kind."""
    counts = kind_counts(params.demo.n_web)
    kinds = [kind for kind in KINDS for _ in range(counts[kind])]
    kinds = [kinds[i] for i in np.random.default_rng([params.seed, 2]).permutation(len(kinds))]
    web = _Web(params, seed, test_ids)
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
