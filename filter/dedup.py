"""Duplicates inside the crawl, and pHash crop banks, the leak check that alignment (filter/copies.py) replaced and
bench/leak_recall.py measures against it.

CLIP similarity alone misses most near-copies (DataComp measured recall 0.02 at precision 0.9 for B/32) and
flags look-alikes, so a copy needs two votes: CLIP proposes, and a check that survives the web's edits confirms
(curate passes alignment; pHashes within a few bits confirm first, where alignment agrees). pHash survives
resizing, re-compression and colour shifts but not crops or flips, so one side of every bank comparison is a
*bank*: the pHashes of a grid of crops of the image and of its mirror image.
"""

from __future__ import annotations

import functools
import io
import itertools
from collections.abc import Callable, Hashable, Sequence

import faiss
import numpy as np
import scipy.fftpack
from PIL import Image

HASH_BYTES = 8
CROP_FRACTIONS = (0.0, 0.05, 0.1)  # per side; the grid covers crops of up to 10% of each side, in any mix


def _gray(image_bytes: bytes) -> Image.Image:
    return Image.open(io.BytesIO(image_bytes)).convert("L")


HASH_SIDE = 8  # imagehash.phash's defaults: an 8x8 block of the DCT of a 32x32 greyscale image
DCT_SIDE = HASH_SIDE * 4


def phashes(grays: Sequence[Image.Image]) -> np.ndarray:
    """imagehash.phash of each greyscale image, packed into 8 bytes per row (n, 8).

    The same bits as imagehash (a test compares them), computed for many images at once: imagehash takes one
    image per call, and its per-call overhead was the largest cost of embedding small images. The DCT is
    scipy.fftpack's, as in imagehash, so the float results, and so the bits, are the same."""
    if not grays:
        return np.zeros((0, HASH_BYTES), np.uint8)
    pixels = np.stack([np.asarray(g.resize((DCT_SIDE, DCT_SIDE), Image.Resampling.LANCZOS)) for g in grays])
    rows = scipy.fftpack.dct(pixels.astype(np.float64), axis=1)[:, :HASH_SIDE]
    return _bits(scipy.fftpack.dct(rows, axis=2)[:, :, :HASH_SIDE])


def _bits(low: np.ndarray) -> np.ndarray:
    """pHash's bits of (n, 8, 8) low DCT blocks: each coefficient against the block's median, packed (n, 8)."""
    flat = low.reshape(len(low), -1)
    return np.packbits(flat > np.median(flat, axis=1, keepdims=True), axis=1)


def phash(image_bytes: bytes) -> bytes:
    return phashes([_gray(image_bytes)])[0].tobytes()


def _lanczos_weights(starts: np.ndarray, ends: np.ndarray, n: int) -> np.ndarray:
    """(k, 32, n): the weights with which PIL's LANCZOS resize of each crop [start, end) of n pixels onto pHash's 32
    takes each pixel (its kernel, widened when shrinking, cut at the crop's edges and normalised, as
    Pillow's precompute_coeffs does), in floating point where Pillow rounds to 8 bits between the passes."""
    size = (ends - starts)[:, None, None]
    scale = size / DCT_SIDE
    support = 3.0 * np.maximum(scale, 1.0)
    centre = (np.arange(DCT_SIDE)[None, :, None] + 0.5) * scale
    pixel = np.arange(n)[None, None, :] - starts[:, None, None]  # positions within the crop
    lo = np.maximum(np.floor(centre - support + 0.5), 0)
    hi = np.minimum(np.floor(centre + support + 0.5), size)
    x = (pixel - centre + 0.5) / np.maximum(scale, 1.0)
    weights = np.where((pixel >= lo) & (pixel < hi), np.sinc(x) * np.sinc(x / 3.0), 0.0)
    return weights / weights.sum(axis=2, keepdims=True)


@functools.lru_cache(maxsize=64)
def _bank_resizers(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(views, 32, h) and (views, 32, w): for each crop of the grid, the matrices that resize an (h, w) picture's
    crop onto pHash's 32x32 grid (rows, columns)."""
    boxes = np.array(
        [
            (round(left * w), round(top * h), w - round(right * w), h - round(bottom * h))
            for left, top, right, bottom in itertools.product(CROP_FRACTIONS, repeat=4)
        ],
        np.float64,
    )
    return _lanczos_weights(boxes[:, 1], boxes[:, 3], h), _lanczos_weights(boxes[:, 0], boxes[:, 2], w)


_DCT_ROWS = 2 * np.cos(np.pi * np.arange(HASH_SIDE)[:, None] * (2 * np.arange(DCT_SIDE) + 1) / (2 * DCT_SIDE))


def crop_bank(image_bytes: bytes) -> np.ndarray:
    """pHashes (m, 8) of every crop of the grid, of the image and of its mirror image. Every crop is resized at
    once by matrices made once per picture size (rounded to 8 bits after each pass, as Pillow does, so that a
    crop's hash is the one phash() gives it), and a mirror image's DCT is the crop's with its odd columns negated:
    cropping and resizing 162 views per image with PIL was most of curate's time on the demo."""
    gray = np.asarray(_gray(image_bytes), np.float64)
    rows, cols = _bank_resizers(*gray.shape)
    across = np.clip(np.rint(gray @ cols.transpose(0, 2, 1)), 0, 255)  # Pillow resizes across, then down
    views = np.clip(np.rint(rows @ across), 0, 255)
    low = _DCT_ROWS @ views @ _DCT_ROWS.T  # scipy.fftpack's DCT-II, its low 8x8 block
    return _bits(np.concatenate([low, low * (-1.0) ** np.arange(HASH_SIDE)]))


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bit distance between packed hashes, broadcasting over leading axes."""
    return np.unpackbits(np.bitwise_xor(a, b), axis=-1).sum(axis=-1)


def exact_duplicates(ids: Sequence[Hashable], digests: Sequence[str]) -> dict[Hashable, Hashable]:
    """{id: the first id (in the given order) with the same bytes} for every later copy (ids: names or rows)."""
    first: dict[str, Hashable] = {}
    out = {}
    for image_id, digest in zip(ids, digests):
        if digest in first:
            out[image_id] = first[digest]
        else:
            first[digest] = image_id
    return out


def near_duplicates(
    ids: Sequence[Hashable],
    neighbors: np.ndarray,
    similarities: np.ndarray,
    min_similarity: float,
    hashes: Sequence[bytes] | None,
    max_distance: int,
    confirm: Callable[[np.ndarray], np.ndarray] | None,
    rank: np.ndarray | None = None,
) -> dict[Hashable, Hashable]:
    """{id: the id kept for its group} for every other member of a group of copies (groups by union-find; ids: names
    or rows).

    neighbors/similarities: each image's CLIP nearest neighbours within the crawl. A pair above min_similarity is
    a copy if its pHashes are within max_distance (a shortcut where the check agrees), or else if confirm, given
    the (k, 2) rows of the earlier (by `rank`, default position) and later member of each such pair, says so (a
    bool per pair); without confirm, CLIP similarity decides alone. A group keeps its earliest member."""
    rank = np.arange(len(ids)) if rank is None else np.asarray(rank)
    parent = list(range(len(ids)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    queries = np.broadcast_to(np.arange(len(ids))[:, None], neighbors.shape)
    close = (neighbors >= 0) & (neighbors != queries) & (similarities >= min_similarity)  # few pairs: copies only
    pairs = sorted(
        {(i, j) if rank[i] < rank[j] else (j, i) for i, j in zip(queries[close].tolist(), neighbors[close].tolist())},
        key=lambda pair: (rank[pair[0]], rank[pair[1]]),
    )
    copies = np.ones(len(pairs), bool)
    if confirm is not None and pairs:
        ends = np.array(pairs)
        if hashes is not None:
            codes = np.frombuffer(b"".join(hashes), np.uint8).reshape(-1, HASH_BYTES)
            copies = hamming(codes[ends[:, 0]], codes[ends[:, 1]]) <= max_distance
        if (~copies).any():
            copies[~copies] = confirm(ends[~copies])
    for (a, b), is_copy in zip(pairs, copies.tolist()):
        if is_copy:
            ra, rb = root(a), root(b)
            parent[max(ra, rb, key=rank.__getitem__)] = min(ra, rb, key=rank.__getitem__)
    return {ids[i]: ids[root(i)] for i in range(len(ids)) if root(i) != i}


class LeakBank:
    """The crop banks of all seed test images in one faiss binary index: which test image does a hash copy?"""

    def __init__(self, test_ids: Sequence[str], test_images: Sequence[bytes]):
        banks = [crop_bank(b) for b in test_images]
        self.owner = np.repeat(np.arange(len(banks)), [len(b) for b in banks])
        self.ids = list(test_ids)
        self.index = faiss.IndexBinaryFlat(HASH_BYTES * 8)
        if banks:
            self.index.add(np.concatenate(banks))

    def matches(self, hashes: Sequence[bytes], max_distance: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """For each hash: the bit distance to the closest crop of any test image, and the rows (into the test ids)
        of every test image with a crop within max_distance. Several images can match: textures dominate small
        pictures' pHashes, so CLIP picks among them."""
        n = len(hashes)
        if not n or not self.index.ntotal:
            return np.full(n, HASH_BYTES * 8, np.int32), [np.zeros(0, np.int64) for _ in range(n)]
        queries = np.frombuffer(b"".join(hashes), np.uint8).reshape(-1, HASH_BYTES)
        closest = self.index.search(queries, 1)[0][:, 0]
        lims, _, rows = self.index.range_search(queries, max_distance + 1)  # faiss keeps distances < radius
        return closest, [np.unique(self.owner[rows[lims[i] : lims[i + 1]]]) for i in range(n)]
