"""Copy detection robust to the edits the web makes: crops, rotations and mirroring, borders, letterboxes and caption
bars, overlays, recompression, blur, rescaling and colour changes, and mixes of them.

A copy is verified by alignment: a candidate (a crawled picture) copies a reference (a seed test picture) if some
placement of a window of the reference on a window of the candidate explains the candidate's colours by an affine
colour map (a 3x4 least-squares fit from the reference's RGB to the candidate's); the score is R^2 of that fit on a
shared grid. The colour map absorbs colour edits (hue rotations, greyscale, channel swaps, contrast); the grid,
averaged over each cell, absorbs recompression, blur and rescaling; the placements cover the geometric edits.

Two steps, so that a pair costs little. Coarse: the reference's 8 rotations and mirror images, each over a grid of
crop windows down to half its area, against views of the candidate that undo framing (the whole, its content
without a uniform border, the picture less a strip along one side where a caption bar sits, the squares of a
letterbox), all scored by one matrix product: each placement's colours are whitened once per reference, so a fit's
explained variance is the squared norm of a product. Fine: the best coarse placement is refined by a local search
that moves the reference window's centre and scale, its aspect held at the candidate view's, on a finer grid.

Written by hand because no maintained library verifies copies of small pictures: local-feature matching (OpenCV's
ORB, SIFT with RANSAC) finds too few keypoints in a 32 px picture to verify anything, and perceptual hashes (pHash,
which dedup.py uses) fail on rotations, large crops and hue changes.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from PIL import Image

PROPOSAL_SIDE = 6  # the grid every reference is compared with every candidate on, to propose references
COARSE_SIDE = 8  # the grid coarse placements are scored on
FINE_SIDE = 12  # the grid refined placements are scored on
CROP_SIDES = (1.0, 0.85, 0.7)  # reference windows, a fraction of each side (independently): 0.7^2 is half the area
CROP_POSITIONS = (0.0, 0.5, 1.0)  # where a window sits along each axis, of the room left
# content boxes: (colour tolerance, pixels left out where a border was cut); the demo web's recompressed borders
# need the first, bench/leak_recall.py's pads the second (pad recall there 0.50 with the first alone, 0.72 with both)
BORDERS = ((24, 2), (60, 3))
STRIPS = (0.14, 0.2)  # the share of one side a caption bar takes, cut off the candidate (refinement finds the rest)
FIRST_STEP, LAST_STEP = 0.08, 0.01  # refinement moves a window's edge by this share of its side, halving down to LAST
REPEAT_GAIN = 1e-3  # a refinement round that gains more than this is repeated at the same step
REFINED = 1  # coarse placements refined per pair
# added to the colour covariances (per pixel), so that a window of one colour has a defined fit; small, as it shrinks
# every fit, a copy's most (README, "Curation", `leak`)
RIDGE = 1e-4
MIN_VARIANCE = 1e-3  # a candidate view flatter than this (per pixel and channel) explains nothing


def _area_weights(starts: np.ndarray, ends: np.ndarray, side: int, n: int) -> np.ndarray:
    """(k, side, n): the share of each of n pixels in each of `side` equal cells of [start, end), per window."""
    step = (ends - starts) / side
    lo = starts[:, None] + step[:, None] * np.arange(side)  # (k, side)
    hi = lo + step[:, None]
    pixel = np.arange(n)
    overlap = np.minimum(hi[..., None], pixel + 1) - np.maximum(lo[..., None], pixel)
    return (np.clip(overlap, 0, None) / step[:, None, None]).astype(np.float32)


def _sample(image: torch.Tensor, boxes: np.ndarray, side: int) -> torch.Tensor:
    """The windows (k, 4: x0, y0, x1, y1 in pixels) of an (H, W, 3) image, each averaged onto a side x side grid:
    (k, side, side, 3). Area averaging is separable: one weight matrix per axis."""
    h, w, _ = image.shape
    rows = torch.from_numpy(_area_weights(boxes[:, 1], boxes[:, 3], side, h))
    cols = torch.from_numpy(_area_weights(boxes[:, 0], boxes[:, 2], side, w))
    tall = (rows @ image.reshape(h, w * 3)).reshape(len(boxes), side, w, 3)
    return torch.einsum("kgwc,kfw->kgfc", tall, cols)


def _turn(grids: torch.Tensor, turn: int) -> torch.Tensor:
    """The turn-th of the 8 rotations and mirror images of (k, s, s, 3) grids."""
    turned = torch.rot90(grids, turn % 4, dims=(1, 2))
    return turned.flip(2) if turn >= 4 else turned


def _centred(grids: torch.Tensor) -> torch.Tensor:
    """(..., s, s, 3) -> (..., s*s, 3), centred per grid."""
    flat = grids.flatten(-3, -2)
    return flat - flat.mean(dim=-2, keepdim=True)


def _whitened(x: torch.Tensor) -> torch.Tensor:
    """Centred colours (p, n, 3) times a factor L of (x'x + ridge)^-1 = L L': y's variance explained by the affine
    fit from x is then |(xL)'y|^2. The 3x3 algebra runs in float64: a window whose colours lie on a line (a grey
    picture) leaves x'x near-singular, which float32 cannot factor at this ridge."""
    n = x.shape[-2]
    gram = (x.transpose(-1, -2) @ x).double() + RIDGE * n * torch.eye(3, dtype=torch.float64)
    return x @ torch.linalg.cholesky(torch.linalg.inv(gram)).float()


def _r2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """R^2 of the affine colour fit of y from x, pair by pair: x, y (p, n, 3) centred -> (p,). The explained
    variance tr(y'x (x'x + ridge)^-1 x'y) takes one batched solve (whitening x takes an inverse and a factoring), in
    float64 as there."""
    total = (y * y).sum(dim=(1, 2))
    xy = x.transpose(1, 2) @ y
    gram = (x.transpose(1, 2) @ x).double() + RIDGE * x.shape[1] * torch.eye(3, dtype=torch.float64)
    explained = (xy * torch.linalg.solve(gram, xy.double()).float()).sum(dim=(1, 2))
    return torch.where(total > MIN_VARIANCE * y.shape[1] * 3, explained / total.clamp_min(1e-12), 0.0)


def _spans(n: int, side: float) -> list[tuple[float, float]]:
    return sorted({((n - n * side) * at, (n - n * side) * at + n * side) for at in CROP_POSITIONS})


def _content_box(pixels: np.ndarray, tolerance: int, cut_inset: int) -> tuple[int, int, int, int]:
    """The box (x0, y0, x1, y1) of the picture without a border of one colour (the colour of most of its corners).
    A resized, recompressed border blends into the picture's outer pixels, so the box leaves out one pixel along
    each side, cut_inset where a border was cut."""
    h, w = pixels.shape[:2]
    corners = pixels[[0, 0, -1, -1], [0, -1, 0, -1]].astype(np.int16)
    border = corners[np.abs(corners - np.median(corners, axis=0)).max(axis=1).argmin()]
    differs = np.abs(pixels.astype(np.int16) - border).max(axis=2) > tolerance
    rows, cols = np.flatnonzero(differs.any(axis=1)), np.flatnonzero(differs.any(axis=0))
    if len(rows) < 8 or len(cols) < 8:
        return 0, 0, w, h
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    inset = cut_inset - 1
    return x0 + 1 + inset * (x0 > 0), y0 + 1 + inset * (y0 > 0), x1 - 1 - inset * (x1 < w), y1 - 1 - inset * (y1 < h)


def candidate_boxes(pixels: np.ndarray) -> np.ndarray:
    """Views (m, 4) of a candidate that undo framing: the whole picture, its content without a uniform border (two
    ways), each less a strip along one side, and for a non-square picture its square at each end and centre."""
    h, w = pixels.shape[:2]
    boxes = {(0, 0, w, h), *(_content_box(pixels, *border) for border in BORDERS)}
    for strip in STRIPS:
        dy, dx = round(h * strip), round(w * strip)
        boxes |= {(0, dy, w, h), (0, 0, w, h - dy), (dx, 0, w, h), (0, 0, w - dx, h)}
    side = min(h, w)
    if abs(h - w) > 2:
        for f in (0.0, 0.5, 1.0):
            top, left = round((h - side) * f), round((w - side) * f)
            boxes.add((left, top, left + side, top + side))
    return np.array(sorted(b for b in boxes if min(b[2] - b[0], b[3] - b[1]) >= 4), np.float32)


def decode(data: bytes) -> np.ndarray:
    """An encoded picture's RGB pixels (H, W, 3)."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def _image(pixels: np.ndarray) -> torch.Tensor:
    return torch.tensor(pixels, dtype=torch.float32) / 255.0


class _Reference:
    """One reference picture and its coarse placements (8 turns x crop windows), whitened."""

    def __init__(self, pixels: np.ndarray):
        self.image = _image(pixels)
        h, w = pixels.shape[:2]
        windows = {
            (x0, y0, x1, y1)
            for sh, sw in itertools.product(CROP_SIDES, repeat=2)
            for (y0, y1), (x0, x1) in itertools.product(_spans(h, sh), _spans(w, sw))
        }
        self.boxes = np.array(sorted(windows), np.float32)
        grids = _sample(self.image, self.boxes, COARSE_SIDE)
        self.x = _whitened(_centred(torch.stack([_turn(grids, t) for t in range(8)]))).flatten(0, 1)


class Candidate:
    """A candidate picture's views, sampled once for all the references it is checked against."""

    def __init__(self, pixels: np.ndarray):
        self.image = _image(pixels)
        self.boxes = candidate_boxes(pixels)
        self.y, self.total = self._views(COARSE_SIDE)
        self.proposal_y, self.proposal_total = self._views(PROPOSAL_SIDE)

    def _views(self, side: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The views on a side x side grid, centred, as (n, views * 3), and each view's sum of squares (inf for a
        flat view: it explains nothing)."""
        y = _centred(_sample(self.image, self.boxes, side))
        total = (y * y).sum(dim=(1, 2))
        return y.permute(1, 0, 2).reshape(side**2, -1), torch.where(
            total > MIN_VARIANCE * side**2 * 3, total, torch.inf
        )


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One torch thread: the matrices here are small, and on a shared machine a second thread waits more than it
    works (a leak check took 4x longer with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _coarse(ref: _Reference, candidate: Candidate) -> torch.Tensor:
    """R^2 (placements, views) of every coarse placement of the reference on every view of the candidate."""
    p, n, _ = ref.x.shape
    explained = (ref.x.transpose(1, 2).reshape(p * 3, n) @ candidate.y).square_()
    return explained.view(p, 3, -1, 3).sum(dim=3).sum(dim=1) / candidate.total


def _refine(ref: _Reference, candidate: Candidate, placement: int, view: int) -> float:
    """Coordinate search over the reference window's centre and scale, its aspect held at the candidate view's
    (the web's edits scale a picture evenly, and a stretch fits look-alikes), each move a share of the window's
    side that halves after a round that gains REPEAT_GAIN or less (the candidate's view stays: moving both fits
    look-alikes too)."""
    turn, window = divmod(placement, len(ref.boxes))
    view_box = candidate.boxes[view].astype(np.float64)
    y = _centred(_sample(candidate.image, view_box[None].astype(np.float32), FINE_SIDE))
    vw, vh = float(view_box[2] - view_box[0]), float(view_box[3] - view_box[1])
    aspect = vw / vh if turn % 2 == 0 else vh / vw  # the window's width / height in the reference
    height, width = ref.image.shape[:2]
    x0, y0, x1, y1 = ref.boxes[window].astype(np.float64)
    side = float(np.sqrt((x1 - x0) * (y1 - y0)))  # the window's height is side / sqrt(aspect)
    state = np.array([(x0 + x1) / 2, (y0 + y1) / 2, side])

    def box(s: np.ndarray) -> np.ndarray | None:
        h = min(float(s[2]) / aspect**0.5, height, width / aspect)
        w = h * aspect
        cx, cy = min(max(float(s[0]), w / 2), width - w / 2), min(max(float(s[1]), h / 2), height - h / 2)
        return None if min(w, h) < 4 else np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])

    current = box(state)
    if current is None:
        return 0.0
    best = float(_r2(_windows(ref, turn, current[None]), y)[0])
    step = FIRST_STEP
    while step >= LAST_STEP:
        moves = []
        for axis, sign in itertools.product(range(3), (-1.0, 1.0)):
            new = state.copy()
            new[axis] = state[axis] * (1 + sign * step) if axis == 2 else state[axis] + sign * step * state[2]
            if (b := box(new)) is not None:
                moves.append((new, b))
        scores = _r2(_windows(ref, turn, np.stack([b for _, b in moves])), y.expand(len(moves), -1, -1))
        top = int(scores.argmax())
        gain = float(scores[top]) - best
        if gain > 0:
            best, state = float(scores[top]), moves[top][0]
        if gain <= REPEAT_GAIN:
            step /= 2
    return best


def _windows(ref: _Reference, turn: int, boxes: np.ndarray) -> torch.Tensor:
    return _centred(_turn(_sample(ref.image, boxes, FINE_SIDE), turn))


def _refined(ref: _Reference, candidate: Candidate, r2: torch.Tensor) -> float:
    """The best refined score of the REFINED best coarse placements (r2: _coarse's)."""
    best = r2.flatten().topk(min(REFINED, r2.numel())).indices
    return max(_refine(ref, candidate, *divmod(int(b), r2.shape[1])) for b in best)


class CopyIndex:
    """The seed test pictures, against which candidates are verified (a reference's coarse placements are prepared
    the first time a candidate is checked against it).

    Besides the references a caller proposes (CLIP's nearest), every candidate is compared with every reference on a
    PROPOSAL_SIDE grid, whole picture against each view, in the reference's 8 turns: CLIP, which is neither rotation
    nor colour invariant, misses the rotated, mirrored and recoloured copies that this finds."""

    def __init__(self, ids: Sequence[str], pictures: Sequence[np.ndarray]):
        self.ids = list(ids)
        self.pictures = list(pictures)
        self._references: dict[int, _Reference] = {}
        whole = [
            _sample(_image(p), np.array([[0, 0, p.shape[1], p.shape[0]]], np.float32), PROPOSAL_SIDE) for p in pictures
        ]
        grids = torch.cat(whole) if whole else torch.zeros(0, PROPOSAL_SIDE, PROPOSAL_SIDE, 3)
        x = _whitened(_centred(torch.stack([_turn(grids, t) for t in range(8)], dim=1)))  # (refs, 8, n, 3)
        self._proposal = x.transpose(2, 3).reshape(-1, PROPOSAL_SIDE**2)  # (refs * 8 * 3, n)

    def propose(self, candidate: Candidate, count: int) -> np.ndarray:
        """The rows of the `count` references whose whole picture, in some turn, best explains a view of the
        candidate on the PROPOSAL_SIDE grid."""
        if not count or not len(self.ids):
            return np.zeros(0, np.int64)
        explained = (self._proposal @ candidate.proposal_y).square_()
        r2 = explained.view(len(self.ids), 8, 3, -1, 3).sum(dim=4).sum(dim=2) / candidate.proposal_total
        return r2.flatten(1).max(dim=1).values.topk(min(count, len(self.ids))).indices.numpy()

    def _reference(self, row: int) -> _Reference:
        if row not in self._references:
            self._references[row] = _Reference(self.pictures[row])
        return self._references[row]

    def coarse(self, candidate: Candidate, row: int) -> torch.Tensor:
        """R^2 (placements, views) of every coarse placement of reference `row` on every view of the candidate."""
        return _coarse(self._reference(row), candidate)

    def best(self, pixels: np.ndarray, rows: Sequence[int], gate: float, proposals: int = 0) -> tuple[float, int]:
        """The copy score of an (H, W, 3) picture against the references in rows and the `proposals` references
        propose() finds, and that reference's row (-1 for none): the refined score where a pair passed the gate,
        else the best coarse score (under the gate)."""
        candidate = Candidate(pixels)
        rows = list(dict.fromkeys([*map(int, rows), *self.propose(candidate, proposals).tolist()]))
        if not rows:
            return 0.0, -1
        coarse, fine = self.score(candidate, rows, gate)
        scores = fine if np.isfinite(fine).any() else coarse
        at = int(np.nanargmax(scores))
        return float(scores[at]), rows[at]

    def score(self, candidate: Candidate, rows: Sequence[int], gate: float) -> tuple[np.ndarray, np.ndarray]:
        """For each reference row: the coarse score (best R^2 of any coarse placement), and the refined score (NaN
        but for the pair with the best coarse score, if that passes `gate`: a copy's own reference outscores the
        others, so one refinement per candidate bounds the cost)."""
        fits = [self.coarse(candidate, int(row)) for row in rows]
        coarse = np.array([float(r2.max()) for r2 in fits], np.float32)
        fine = np.full(len(rows), np.nan, np.float32)
        at = int(coarse.argmax()) if len(rows) else 0
        if len(rows) and coarse[at] >= gate:
            fine[at] = _refined(self._reference(int(rows[at])), candidate, fits[at])
        return coarse, fine


POOL_MIN = 2_000  # candidates below which starting worker processes (a torch import each) costs more than it saves
_worker_index: CopyIndex | None = None


def _one_torch_thread() -> None:
    torch.set_num_threads(1)


def _start_worker(ids: list[str], pictures: list[np.ndarray]) -> None:
    global _worker_index
    _one_torch_thread()
    _worker_index = CopyIndex(ids, pictures)


def _best_in_worker(image: bytes, rows: np.ndarray, gate: float, proposals: int) -> tuple[float, int]:
    return _worker_index.best(decode(image), rows, gate, proposals)


@contextlib.contextmanager
def verifier(
    ids: Sequence[str], pictures: Sequence[np.ndarray], workers: int, candidates: int
) -> Iterator[Callable[[Sequence[bytes], Sequence[np.ndarray], float, int], list[tuple[float, int]]]]:
    """A function giving CopyIndex.best of each encoded candidate against its rows, over `workers` processes when
    there are POOL_MIN `candidates` or more (one index each; every pair is scored the same way in any process)."""
    if workers <= 1 or candidates < POOL_MIN:
        index = CopyIndex(ids, pictures)
        with one_thread():
            yield lambda images, rows, gate, proposals: [
                index.best(decode(image), r, gate, proposals) for image, r in zip(images, rows)
            ]
        return
    spawn = multiprocessing.get_context("spawn")  # fork after torch has started threads can hang
    with ProcessPoolExecutor(workers, spawn, initializer=_start_worker, initargs=(list(ids), list(pictures))) as pool:
        yield lambda images, rows, gate, proposals: list(
            pool.map(
                _best_in_worker,
                images,
                rows,
                itertools.repeat(gate),
                itertools.repeat(proposals),
                chunksize=max(1, -(-len(images) // (4 * workers))),
            )
        )


def pair_scores(images: Sequence[bytes], pairs: Sequence[tuple[int, int]], gate: float) -> list[float]:
    """The copy score of each pair of encoded pictures (positions into images), either way round: a crop keeps only
    part of its original, and only the original can be the reference, so the pair is scored both ways (each refined
    if its coarse score passes the gate, else its coarse score stands; the coarse scores do not tell which way is
    right) and the better way counts. Each picture is prepared once."""
    prepared: dict[int, tuple[_Reference, Candidate]] = {}

    def picture(at: int) -> tuple[_Reference, Candidate]:
        if at not in prepared:
            pixels = decode(images[at])
            prepared[at] = _Reference(pixels), Candidate(pixels)
        return prepared[at]

    scores = []
    for first, second in pairs:
        (first_ref, first_view), (second_ref, second_view) = picture(first), picture(second)
        way_scores = []
        for ref, candidate in ((first_ref, second_view), (second_ref, first_view)):
            r2 = _coarse(ref, candidate)
            way_scores.append(_refined(ref, candidate, r2) if float(r2.max()) >= gate else float(r2.max()))
        scores.append(max(way_scores))
    return scores


def _pair_shares(
    images: Sequence[bytes], pairs: Sequence[tuple[int, int]], shares: int
) -> Iterator[tuple[list[bytes], list[tuple[int, int]]]]:
    """The pairs in `shares` runs, in order (a picture's pairs mostly fall in one), each with only its pictures."""
    for share in np.array_split(np.arange(len(pairs)), shares):
        used = sorted({at for k in share for at in pairs[k]})
        position = {at: i for i, at in enumerate(used)}
        yield [images[at] for at in used], [(position[pairs[k][0]], position[pairs[k][1]]) for k in share]


@contextlib.contextmanager
def pair_scorer(
    workers: int, pairs: int
) -> Iterator[Callable[[Sequence[bytes], Sequence[tuple[int, int]], float], list[float]]]:
    """A function giving pair_scores, over `workers` processes when there are POOL_MIN `pairs` or more in all (the
    processes start once, however many batches the caller sends; every pair scores the same in any process)."""
    if workers <= 1 or pairs < POOL_MIN:
        with one_thread():
            yield pair_scores
        return
    spawn = multiprocessing.get_context("spawn")  # fork after torch has started threads can hang
    with ProcessPoolExecutor(workers, spawn, initializer=_one_torch_thread) as pool:

        def in_workers(images: Sequence[bytes], pairs: Sequence[tuple[int, int]], gate: float) -> list[float]:
            shares = list(_pair_shares(images, pairs, 4 * workers))
            done = pool.map(pair_scores, *zip(*shares), itertools.repeat(gate))
            return [score for scores in done for score in scores]

        yield in_workers
