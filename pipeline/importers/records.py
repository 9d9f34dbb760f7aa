"""What an importer yields, and how a record becomes a seed shard row (one image policy for every dataset)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from dextra.pipeline.errors import InputError
from dextra.pipeline.importers.files import read_captions
from dextra.pipeline.shards import sha256_hex

KEPT_FORMATS = ("JPEG", "PNG")
_ORIENTATION = 0x0112  # EXIF tag


@dataclass(frozen=True)
class Record:
    """One seed image, listed without being opened, so a subset of a large set only reads the images it keeps."""

    key: str  # unique within the dataset; the row id is "<manifest name>-<key>"
    image: Path
    split: str | None  # train | test; None: the seed stage assigns one
    cls: str | None = None
    captions: tuple[str, ...] = ()
    caption_file: Path | None = None  # Reed et al. text file, read when the record is loaded
    listed_in: Path | None = None  # the file that names this image, for error messages


def encode_image(path: Path, listed_in: Path | None = None) -> tuple[bytes, tuple[int, int]]:
    """The bytes stored for an image file, and its size. An upright RGB JPEG or PNG is kept byte for byte (no
    generation loss, no growth, same sha256 as the file); anything else (grey, CMYK, alpha, palette, EXIF-rotated,
    other formats) becomes an upright RGB PNG. Every image is decoded in full, so a truncated file is an error here."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        where = f" (listed in {listed_in})" if listed_in else ""
        raise InputError(f"{path}: image not found{where}") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.format in KEPT_FORMATS and image.mode == "RGB" and image.getexif().get(_ORIENTATION, 1) == 1:
                return data, image.size
            image = ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"{path}: not a readable image ({exc})") from None
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue(), image.size


def shard_row(
    id_: str, image: bytes, size: tuple[int, int], captions: list[str], split: str, cls: str | None, source: str
) -> dict:
    """One row of IMAGE_SCHEMA for a seed image."""
    return {
        "id": id_,
        "image": image,
        "width": size[0],
        "height": size[1],
        "captions": captions,
        "split": split,
        "class": cls,
        "source": source,
        "url": None,
        "sha256": sha256_hex(image),
    }


def load_row(record: Record, source: str) -> dict:
    """Read the record's image (and caption file) into a shard row; `source` is the manifest name."""
    captions = read_captions(record.caption_file) if record.caption_file else list(record.captions)
    image, size = encode_image(record.image, record.listed_in)
    return shard_row(f"{source}-{record.key}", image, size, captions, record.split, record.cls, source)
