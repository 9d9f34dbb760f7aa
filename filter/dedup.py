"""Duplicates inside the crawl, and leaks: crawled near-copies of seed *test* images.

CLIP similarity alone misses most near-copies (DataComp measured recall 0.02 at precision 0.9 for B/32) and
flags look-alikes, so a copy needs two votes: CLIP proposes, a perceptual hash (imagehash's pHash) confirms.
pHash survives resizing, re-compression and colour shifts but not crops or flips, so one side of every
comparison is a *bank*: the pHashes of a grid of crops of the image and of its mirror image.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Callable, Hashable, Sequence

import faiss
import numpy as np
import scipy.fftpack
from PIL import Image, ImageOps

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
    low = scipy.fftpack.dct(rows, axis=2)[:, :, :HASH_SIDE].reshape(len(grays), -1)
    return np.packbits(low > np.median(low, axis=1, keepdims=True), axis=1)


def phash(image_bytes: bytes) -> bytes:
    return phashes([_gray(image_bytes)])[0].tobytes()


def crop_bank(image_bytes: bytes) -> np.ndarray:
    """pHashes (m, 8) of every crop of the grid, of the image and of its mirror image."""
    image = _gray(image_bytes)
    w, h = image.size
    views = []
    for left, top, right, bottom in itertools.product(CROP_FRACTIONS, repeat=4):
        crop = image.crop((round(left * w), round(top * h), w - round(right * w), h - round(bottom * h)))
        views += [crop, ImageOps.mirror(crop)]
    return phashes(views)


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
    read_images: Callable[[Sequence[int]], list[bytes]] | None,
    max_distance: int,
    rank: np.ndarray | None = None,
) -> dict[Hashable, Hashable]:
    """{id: the id kept for its group} for every other member of a group of copies (groups by union-find; ids: names
    or rows).

    neighbors/similarities: each image's CLIP nearest neighbours within the crawl. A pair above min_similarity is
    a copy if the pHash of the later one (by `rank`, default position) is within max_distance of the crop bank of
    the earlier one; without images (hashes None) CLIP similarity decides alone. A group keeps its earliest member.
    read_images(rows) returns the encoded images of those rows; it is called once, for the earlier member of every
    candidate pair, so a large crawl's other images are never read.
    """
    rank = np.arange(len(ids)) if rank is None else np.asarray(rank)
    parent = list(range(len(ids)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    queries = np.broadcast_to(np.arange(len(ids))[:, None], neighbors.shape)
    close = (neighbors >= 0) & (neighbors != queries) & (similarities >= min_similarity)  # few pairs: copies only
    pairs = [
        (i, j) if rank[i] < rank[j] else (j, i) for i, j in zip(queries[close].tolist(), neighbors[close].tolist())
    ]
    earlier = sorted({a for a, _ in pairs}) if hashes is not None else []
    images = dict(zip(earlier, read_images(earlier))) if earlier else {}
    banks: dict[int, np.ndarray] = {}
    for a, b in pairs:
        if root(a) == root(b):
            continue
        if hashes is not None:
            if a not in banks:
                banks[a] = crop_bank(images.pop(a))
            if hamming(banks[a], np.frombuffer(hashes[b], np.uint8)).min() > max_distance:
                continue
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
