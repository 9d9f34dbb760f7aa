"""Checks on downloaded bytes before img2dataset's resizer decodes them.

img2dataset hands every body to cv2.imdecode: a 20000×20000 PNG of a few kB is decoded in full, a JPEG cut
short decodes into a grey-padded picture that counts as a success, and a 16-bit PNG saturates to white when
re-encoded as 8-bit. Here the pixel count is read from the header (Pillow parses only that), truncated JPEGs
are caught by their missing end marker, and 16-bit images are brought to 8 bits before the resizer sees them.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

_JPEG_START, _JPEG_END = b"\xff\xd8", b"\xff\xd9"
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


class UnusableImage(Exception):
    """Bytes that are not an image the pipeline stores; the message says why in plain words."""


# The formats the pipeline stores, by their signatures (WebP also needs "WEBP" at offset 8: image_format).
FORMAT_MAGIC = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF8", "gif"), (b"RIFF", "webp"))
FORMAT_NAMES = {"jpg": "JPEG", "png": "PNG", "gif": "GIF", "webp": "WebP"}


def _claimed_format(data: bytes) -> str | None:
    return next((extension for magic, extension in FORMAT_MAGIC if data.startswith(magic)), None)


def image_format(data: bytes) -> str | None:
    """The file extension of these image bytes by their magic bytes (jpg, png, gif or webp), or None."""
    claimed = _claimed_format(data)
    return None if claimed == "webp" and data[8:12] != b"WEBP" else claimed


def _describe(data: bytes) -> str:
    claimed = _claimed_format(data)
    if claimed is not None:
        return f"a {FORMAT_NAMES[claimed]} whose header is cut short or corrupt"
    head = data[:64].lstrip()
    if head[:1] == b"<":
        return "an HTML or XML page"
    if head[:1] in (b"{", b"["):
        return "JSON or text"
    return f"{len(data)} bytes of an unknown format"


def check_image(data: bytes, max_pixels: int) -> bytes:
    """The bytes to hand to the resizer: `data` itself, or an 8-bit PNG of it for 16-bit images."""
    if not data:
        raise UnusableImage("empty body (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as exc:  # Pillow's own limit, far above max_pixels, hides the size
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(pixels.group(1)):,} pixels" if pixels else str(exc)
        raise UnusableImage(
            f"decompression bomb: {size} is over fetch.max_pixels ({max_pixels:,}), read from the header; not decoded"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise UnusableImage(f"not an image: {_describe(data)}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise UnusableImage(
            f"decompression bomb: {width * height:,} pixels ({width}x{height}) is over fetch.max_pixels "
            f"({max_pixels:,}), read from the header; not decoded"
        )
    if data[:2] == _JPEG_START and _JPEG_END not in data[-1024:]:
        raise UnusableImage(f"truncated JPEG: no end-of-image marker in its {len(data)} bytes")
    if image.mode in _SIXTEEN_BIT_MODES or (image.format == "PNG" and data[24:25] == b"\x10"):
        return _eight_bit_png(image)
    return data


def _eight_bit_png(image: Image.Image) -> bytes:
    """cv2 keeps 16 bits and img2dataset's 8-bit encode then clips them to white: keep the high byte instead."""
    try:
        if image.mode in _SIXTEEN_BIT_MODES:
            image = Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8), "L")
        else:
            image.load()  # Pillow reads 16-bit colour PNGs as 8-bit RGB(A) already
    except (OSError, ValueError) as exc:
        raise UnusableImage(f"cannot decode {image.format} image ({exc})") from None
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()
