"""Copy detection robust to the edits the web makes: crops, rotations and mirroring, borders and caption bars,
overlays, recompression, blur, rescaling and colour changes.

Each picture becomes a small *structure map*: its pixels projected on their own main colour axis (the first
principal component of its colours), shrunk to MAP_SIDE x MAP_SIDE, centred and scaled to unit length. Colour edits
move the colours but not which pixels share a colour, so the map survives them (its sign may flip, so both signs
are compared); small maps also survive recompression, blur, rescaling and thin overlays. The geometric edits are
covered by views: every reference (seed test) picture adds the maps of its 8 rotations and mirror images, each over
a grid of crops down to half the area; every candidate (crawled) picture is compared through a few views that undo
framing: the whole, its content without a uniform border, and the picture less a strip along each side (where a
caption bar sits). The cosine of two maps is their normalised cross-correlation; faiss finds the best pair.

Written by hand because no maintained library does this for small pictures: local-feature matching (ORB, SIFT with
RANSAC) finds too few keypoints in a 32 px image to verify anything, and pHash, which dedup.py uses for duplicates
inside the crawl, fails on rotations, large crops and hue changes.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import faiss
import numpy as np
from PIL import Image

MAP_SIDE = 16
CROP_SIDES = (1.0, 0.9, 0.8, 0.7)  # reference crops, as a fraction of each side: 0.7^2 is half the area
CROP_POSITIONS = (0.0, 0.5, 1.0)  # where the crop window sits along each axis, of the room left
STRIPS = (0.15, 0.25)  # the share of one side a caption bar takes, cut off the candidate
DIHEDRAL = tuple(itertools.product(range(4), (False, True)))  # quarter turns, then a mirror


def structure_map(pixels: np.ndarray) -> np.ndarray:
    """The picture's (H, W, 3) pixels projected on their main colour axis, at MAP_SIDE x MAP_SIDE, as a unit
    vector (zeros for a picture of one colour)."""
    colours = pixels.reshape(-1, 3).astype(np.float32)
    colours -= colours.mean(axis=0)
    axis = np.linalg.svd(colours.T @ colours)[0][:, 0]
    projected = (pixels.astype(np.float32) @ axis).astype(np.float32)
    small = np.asarray(Image.fromarray(projected, "F").resize((MAP_SIDE, MAP_SIDE), Image.Resampling.BOX))
    flat = small.reshape(-1) - small.mean()
    norm = np.linalg.norm(flat)
    return flat / norm if norm > 1e-6 else np.zeros_like(flat)


def _dihedral(pixels: np.ndarray, turns: int, mirror: bool) -> np.ndarray:
    turned = np.rot90(pixels, turns)
    return np.ascontiguousarray(turned[:, ::-1] if mirror else turned)


def reference_views(pixels: np.ndarray) -> np.ndarray:
    """Maps (m, MAP_SIDE^2) of every rotation and mirror image of the picture, each over the crop grid."""
    maps = []
    h, w = pixels.shape[:2]
    windows = {
        (round((h - round(h * side)) * py), round((w - round(w * side)) * px), round(h * side), round(w * side))
        for side in CROP_SIDES
        for py in CROP_POSITIONS
        for px in CROP_POSITIONS
    }
    for top, left, ch, cw in sorted(windows):
        crop = pixels[top : top + ch, left : left + cw]
        maps += [structure_map(_dihedral(crop, t, m)) for t, m in DIHEDRAL]
    return np.stack(maps)


def _content(pixels: np.ndarray, tolerance: int = 12) -> np.ndarray:
    """The picture without a border of one colour (the colour of its corner pixel)."""
    differs = np.abs(pixels.astype(np.int16) - pixels[0, 0].astype(np.int16)).max(axis=2) > tolerance
    rows, cols = np.flatnonzero(differs.any(axis=1)), np.flatnonzero(differs.any(axis=0))
    if len(rows) < 4 or len(cols) < 4:
        return pixels
    # a resized border blends into the picture's first row or column: leave it out where a border was cut
    top, bottom = rows[0] + (rows[0] > 0), rows[-1] + 1 - (rows[-1] < len(differs) - 1)
    left, right = cols[0] + (cols[0] > 0), cols[-1] + 1 - (cols[-1] < differs.shape[1] - 1)
    return pixels[top:bottom, left:right]


def candidate_views(pixels: np.ndarray) -> np.ndarray:
    """Maps (m, MAP_SIDE^2) of the views that undo framing: the whole picture, its content without a uniform
    border, each less a strip along one side, and for a non-square picture its square at each end and centre."""
    h, w = pixels.shape[:2]
    views = [pixels, _content(pixels)]
    for strip in STRIPS:
        dy, dx = round(h * strip), round(w * strip)
        views += [pixels[dy:], pixels[: h - dy], pixels[:, dx:], pixels[:, : w - dx]]
    side = min(h, w)
    if abs(h - w) > 2:
        for f in (0.0, 0.5, 1.0):
            top, left = round((h - side) * f), round((w - side) * f)
            views.append(pixels[top : top + side, left : left + side])
    return np.stack([structure_map(v) for v in views if min(v.shape[:2]) >= 4])


class CopyIndex:
    """The reference views of many pictures (the seed test images) in one faiss inner-product index."""

    def __init__(self, ids: Sequence[str], pictures: Sequence[np.ndarray]):
        banks = [reference_views(p) for p in pictures]
        self.ids = list(ids)
        self.owner = np.repeat(np.arange(len(banks)), [len(b) for b in banks])
        self.index = faiss.IndexFlatIP(MAP_SIDE * MAP_SIDE)
        if banks:
            self.index.add(np.concatenate(banks).astype(np.float32))

    def best(self, pictures: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """For each candidate picture: the best cosine of any of its views (either sign) to any reference view,
        and the row (into ids) of that reference picture (-1 without references)."""
        scores, owners = np.full(len(pictures), -1.0, np.float32), np.full(len(pictures), -1, np.int64)
        if not self.index.ntotal:
            return scores, owners
        for i, picture in enumerate(pictures):
            views = candidate_views(picture)
            found, rows = self.index.search(np.concatenate([views, -views]).astype(np.float32), 1)
            best = int(found[:, 0].argmax())
            scores[i], owners[i] = found[best, 0], self.owner[rows[best, 0]]
        return scores, owners
