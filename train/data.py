"""Training sets, decoded once: every image file (a curated shard, a seed split) becomes a memory-mapped uint8 array,
or float16 VAE latents, under checkpoints/cache/, beside an array of the set's condition rows. Entries are keyed by
the content hash of their inputs and by everything that shapes the arrays, so they are built once and shared by
runs and processes, and a new shard costs only its own decoding. The step loop then only indexes arrays: no PIL,
no tokenizer and no text encoder on the hot path (`tokens` conditioning runs the text encoder inside the model,
because it may be trained).

A curated web image has one condition (its extrapolated text embedding, its CLIP image embedding, or the tokens of
its best-matched neighbour caption); a seed image has one per caption (or its image embedding); a batch picks one of
an image's conditions at random.

Which images a batch holds, and every random draw that goes with it, is a function of the seed and the batch's data
position (samples drawn before it, all processes together): a resumed run continues exactly where the killed one
stopped, mid-epoch, without replaying the seen batches, and each process of a multi-process run reads its own slice.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch
from diffusers import AutoencoderKL
from PIL import Image, ImageOps, UnidentifiedImageError

from dextra.filter.clip import MODEL_INFO, load_clip
from dextra.pipeline.atomic import atomic_path, write_json
from dextra.pipeline.errors import InputError
from dextra.pipeline.paths import Paths
from dextra.pipeline.shards import (
    CURATED_SCHEMA,
    IMAGE_SCHEMA,
    file_sha256,
    read_embeddings,
    read_table,
    read_tables,
    shard_files,
)
from dextra.train.model import vae_downscale
from dextra.train.text_encoder import CaptionTokenizer

CACHE_FORMAT = 1  # bump when what an entry holds changes
CHUNK = 256  # images decoded (and VAE-encoded) at a time while an entry is built
CPU = torch.device("cpu")


@dataclass(eq=False)
class Encoding:
    """How a set becomes arrays: pixel side, condition mode, and optionally a VAE (whose latents are cached instead
    of pixels; with `flip`, the mirrored image's too, so random flips stay exact) or a tokenizer (`tokens` mode)."""

    resolution: int
    mode: str
    vae: AutoencoderKL | None = None
    flip: bool = False
    tokenizer: Callable[[list[str]], torch.Tensor] | None = None
    tokenizer_id: str | None = None
    device: torch.device = torch.device("cpu")

    @classmethod
    def create(
        cls,
        paths: Paths,
        resolution: int,
        mode: str,
        vae: AutoencoderKL | None = None,
        flip: bool = False,
        device: torch.device = CPU,
        tokenizer: CaptionTokenizer | None = None,
    ) -> Encoding:
        """`tokenizer`: a transformers text encoder's, for `tokens`; without one, CLIP's from models/clip."""
        if mode != "tokens":
            return cls(resolution, mode, vae, flip, device=device)
        if tokenizer is not None:
            return cls(resolution, mode, vae, flip, tokenizer, tokenizer.identity, device)
        return cls(
            resolution, mode, vae, flip, load_clip(paths.clip).tokenizer, file_sha256(paths.clip / MODEL_INFO), device
        )

    @cached_property
    def image_key(self) -> dict:
        if self.vae is None:
            return {"resolution": self.resolution, "vae": None}
        digest = hashlib.sha256()
        for name, tensor in self.vae.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return {"resolution": self.resolution, "vae": digest.hexdigest(), "flip": self.flip}

    def tokenize(self, captions: list[str]) -> np.ndarray:
        return self.tokenizer(captions).numpy().astype(np.int32)


class TrainingSet:
    """Images (uint8 pixels (N, 3, R, R), or float16 latents (N, views, C, h, w)) split over per-file arrays, and
    condition rows: image i's are rows first[i] : first[i] + count[i] of `conditions`. `key` names the content."""

    def __init__(
        self, images: list[np.ndarray], conditions: np.ndarray, first: np.ndarray, count: np.ndarray, key: str
    ):
        self.images, self.conditions, self.first, self.count, self.key = images, conditions, first, count, key
        self.offsets = np.cumsum([0] + [len(a) for a in images])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def latent(self) -> bool:
        return self.images[0].dtype == np.float16

    @property
    def condition_size(self) -> int:
        return int(self.conditions.shape[1])

    def gather(self, index: np.ndarray) -> np.ndarray:
        part = np.searchsorted(self.offsets, index, side="right") - 1
        out = np.empty((len(index), *self.images[0].shape[1:]), self.images[0].dtype)
        for k in np.unique(part):
            chosen = part == k
            out[chosen] = self.images[k][index[chosen] - self.offsets[k]]
        return out

    def condition_rows(self, rows: np.ndarray) -> torch.Tensor:
        """Embeddings as float32, token ids as int64."""
        values = np.asarray(self.conditions[rows])
        return torch.from_numpy(values.astype(np.int64 if values.dtype.kind == "i" else np.float32))

    def batch(
        self, index: np.ndarray, generator: torch.Generator, random_flip: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images `index` in [-1, 1] (or their latents), each with one of its conditions, half of them mirrored when
        `random_flip`."""
        size = len(index)
        rows = self.first[index] + (torch.rand(size, generator=generator).numpy() * self.count[index]).astype(np.int64)
        flip = (torch.rand(size, generator=generator) < 0.5) & random_flip
        stored = torch.from_numpy(self.gather(index))
        if self.latent:  # view 1, where cached, is the mirrored image's latent
            views = flip.long() if stored.shape[1] == 2 else torch.zeros(size, dtype=torch.long)
            return stored[torch.arange(size), views].float(), self.condition_rows(rows)
        pixels = stored.float() / 127.5 - 1
        return torch.where(flip[:, None, None, None], pixels.flip(-1), pixels), self.condition_rows(rows)

    def pixels(self) -> torch.Tensor:
        """Every image in [0, 1] (pixel sets only)."""
        return torch.from_numpy(self.gather(np.arange(len(self)))).float() / 255

    def first_conditions(self, n: int) -> torch.Tensor:
        """The first condition of each of the first n images: what the checkpoint sample grids are drawn for."""
        return self.condition_rows(self.first[: min(n, len(self))])


class DataStream:
    """Samples are numbered across epochs; epoch e is a permutation of the set seeded by (seed, stream name, e)."""

    def __init__(self, size: int, seed: int, name: str):
        self.size, self.seed, self._orders = size, [seed, zlib.crc32(name.encode())], {}

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
            self._orders[epoch] = np.random.default_rng([*self.seed, epoch]).permutation(self.size)
        return self._orders[epoch]

    def indices(self, position: int, count: int) -> np.ndarray:
        positions = np.arange(position, position + count)
        epochs = positions // self.size
        return np.concatenate([self.order(int(e))[positions[epochs == e] % self.size] for e in np.unique(epochs)])

    def generators(self, position: int, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
        """A host and a device generator seeded by the position: a batch's caption picks, flips, noise, timesteps
        and NULL drops are the same whenever, and on whichever process, it is drawn."""
        host, on_device = np.random.SeedSequence([*self.seed, position]).generate_state(2, np.uint64)
        return torch.Generator().manual_seed(int(host)), torch.Generator(device).manual_seed(int(on_device))


def decode_images(blobs: Sequence[bytes], resolution: int, where: Path, first_row: int = 0) -> np.ndarray:
    """Centre-crop to a square and resize, as uint8 (N, 3, R, R); decoded on a few threads (PIL releases the GIL)."""

    def decode(item: tuple[int, bytes]) -> np.ndarray:
        row, blob = item
        try:
            image = Image.open(io.BytesIO(blob)).convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise InputError(f"{where}: row {row} is not a readable image ({exc})") from None
        return np.asarray(ImageOps.fit(image, (resolution, resolution), Image.Resampling.BICUBIC)).transpose(2, 0, 1)

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return np.stack(list(pool.map(decode, enumerate(blobs, first_row))))


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, pixels: np.ndarray, flip: bool, device: torch.device) -> np.ndarray:
    """(N, views, C, h, w) float16: the posterior mean, shifted and scaled like diffusers' pipelines expect."""
    x = torch.from_numpy(pixels).to(device).float() / 127.5 - 1
    views = [x, x.flip(-1)] if flip else [x]
    latents = torch.stack([vae.encode(v).latent_dist.mode() for v in views], 1)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latents - shift) * vae.config.scaling_factor).half().cpu().numpy()


def _entry(paths: Paths, key: dict, build: Callable[[Path], None]) -> Path:
    """The cache folder for `key`, built atomically by `build(folder)` the first time."""
    folder = paths.train_cache / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    if not (folder / "key.json").exists():
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            build(tmp)
            write_json(tmp / "key.json", key)
    return folder


def _load(folder: Path, name: str) -> np.ndarray:
    try:
        return np.load(folder / f"{name}.npy", mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise InputError(f"{folder}: unreadable cache entry ({exc}); delete the folder and run again") from None


def _images(
    paths: Paths, file: Path, sha: str, blobs: Callable[[], list[bytes]], enc: Encoding
) -> tuple[np.ndarray, str]:
    """The image (or latent) array of one file, and its cache entry's name."""

    def build(tmp: Path) -> None:
        data = blobs()
        n, size = len(data), enc.resolution
        if enc.vae is None:
            shape, dtype = (n, 3, size, size), np.uint8
        else:
            side = size // vae_downscale(enc.vae)
            shape, dtype = (n, 2 if enc.flip else 1, enc.vae.config.latent_channels, side, side), np.float16
            enc.vae.to(enc.device)
        out = np.lib.format.open_memmap(tmp / "images.npy", "w+", dtype, shape)
        for start in range(0, n, CHUNK):
            pixels = decode_images(data[start : start + CHUNK], size, file, start)
            out[start : start + len(pixels)] = (
                pixels if enc.vae is None else encode_latents(enc.vae, pixels, enc.flip, enc.device)
            )
        out.flush()

    folder = _entry(paths, {"kind": "images", "format": CACHE_FORMAT, "file": sha, **enc.image_key}, build)
    return _load(folder, "images"), folder.name


def _save_conditions(tmp: Path, conditions: np.ndarray, count: np.ndarray, captions: list[str] | None = None) -> None:
    np.save(tmp / "conditions.npy", conditions)
    np.save(tmp / "first.npy", (np.cumsum(count) - count).astype(np.int64))
    np.save(tmp / "count.npy", count.astype(np.int64))
    if captions is not None:
        write_json(tmp / "captions.json", captions)


def _set(images: list[tuple[np.ndarray, str]], folder: Path) -> TrainingSet:
    """A set from its image entries and its conditions entry; its key names all of them."""
    arrays = {name: _load(folder, name) for name in ("conditions", "first", "count")}
    key = hashlib.sha256(" ".join([folder.name, *(entry for _, entry in images)]).encode()).hexdigest()
    return TrainingSet(
        [array for array, _ in images],
        arrays["conditions"],
        np.asarray(arrays["first"]),
        np.asarray(arrays["count"]),
        key,
    )


def vectors_by_id(files: list[Path], ids: list[str], where: Path) -> np.ndarray:
    info, vectors = read_embeddings(files)
    row = {image_id: i for i, image_id in enumerate(info.column("id").to_pylist())}
    missing = [image_id for image_id in ids if image_id not in row]
    if missing:
        raise InputError(
            f"{where}: no image embedding for {len(missing)} image(s), e.g. {', '.join(missing[:3])} "
            "(run `dextra embed`)"
        )
    return vectors[[row[i] for i in ids]].astype(np.float16)


def load_extra(paths: Paths, enc: Encoding) -> TrainingSet:
    """The curated extra set, conditioned per `enc.mode` (pooled: the extrapolated text embeddings)."""
    folder = paths.curated_shards
    files = shard_files(folder)
    if not files:
        raise InputError(f"{folder}: no curated shards (*.parquet); run `dextra curate` first")
    rows = [read_table(f, CURATED_SCHEMA, columns=["id"]).num_rows for f in files]
    files = [f for f, n in zip(files, rows) if n]
    if not files:
        raise InputError(f"{folder}: the curated shards hold no images; nothing to pretrain on")
    shas = [file_sha256(f) for f in files]
    embeddings = shard_files(paths.embeddings / "crawl_images") if enc.mode == "image" else []
    key = {
        "kind": "conditions",
        "format": CACHE_FORMAT,
        "set": "extra",
        "mode": enc.mode,
        "files": shas,
        "embeddings": [file_sha256(f) for f in embeddings],
        "tokenizer": enc.tokenizer_id,
    }

    def build(tmp: Path) -> None:
        if enc.mode == "pooled":
            column = (
                read_tables(files, CURATED_SCHEMA, columns=["text_embedding"]).column("text_embedding").combine_chunks()
            )
            lengths = pc.list_value_length(column).to_numpy()
            if lengths.min() == 0 or lengths.min() != lengths.max():
                raise InputError(
                    f"{folder}: column 'text_embedding' must have one length in every row "
                    f"(got {lengths.min()}..{lengths.max()})"
                )
            conditions = column.flatten().to_numpy(zero_copy_only=False).astype(np.float16).reshape(len(lengths), -1)
        elif enc.mode == "image":
            ids = read_tables(files, CURATED_SCHEMA, columns=["id"]).column("id").to_pylist()
            conditions = vectors_by_id(embeddings, ids, paths.embeddings / "crawl_images")
        else:
            table = read_tables(files, CURATED_SCHEMA, columns=["neighbor_captions", "neighbor_weights"])
            best = [
                c[int(np.argmax(w))]
                for c, w in zip(
                    table.column("neighbor_captions").to_pylist(), table.column("neighbor_weights").to_pylist()
                )
            ]
            conditions = enc.tokenize(best)
        _save_conditions(tmp, conditions, np.ones(len(conditions), np.int64))

    images = [
        _images(
            paths, f, sha, lambda f=f: read_table(f, CURATED_SCHEMA, columns=["image"]).column("image").to_pylist(), enc
        )
        for f, sha in zip(files, shas)
    ]
    return _set(images, _entry(paths, key, build))


def load_seed(paths: Paths, split: str, enc: Encoding) -> tuple[TrainingSet, list[str]]:
    """A seed split conditioned per `enc.mode` (pooled: its caption embeddings, one row per caption); also the text
    of every condition row (image mode: each image's first caption)."""
    path = paths.seed_split(split)
    if not path.exists():
        raise InputError(f"{path}: file not found (run `dextra seed` first)")
    kind = "seed_images" if enc.mode == "image" else "seed_captions"
    embedding_path = paths.embedding_file(kind, split)
    if not embedding_path.exists():
        raise InputError(f"{embedding_path}: not found (run `dextra embed` first)")
    sha = file_sha256(path)
    key = {
        "kind": "conditions",
        "format": CACHE_FORMAT,
        "set": split,
        "mode": enc.mode,
        "file": sha,
        "embeddings": file_sha256(embedding_path),
        "tokenizer": enc.tokenizer_id,
    }

    def build(tmp: Path) -> None:
        table = read_table(path, IMAGE_SCHEMA, columns=["id", "captions"])
        ids = table.column("id").to_pylist()
        if not ids:
            raise InputError(f"{path}: no images")
        if enc.mode == "image":
            first_captions = [c[0] if c else "" for c in table.column("captions").to_pylist()]
            _save_conditions(
                tmp, vectors_by_id([embedding_path], ids, embedding_path), np.ones(len(ids), np.int64), first_captions
            )
            return
        info, vectors = read_embeddings([embedding_path])
        if "caption" not in info.column_names:
            raise InputError(f"{embedding_path}: missing column 'caption'")
        position = {image_id: i for i, image_id in enumerate(ids)}
        owner = np.array([position.get(image_id, -1) for image_id in info.column("id").to_pylist()], np.int64)
        keep = np.flatnonzero(owner >= 0)
        order = keep[np.argsort(owner[keep], kind="stable")]
        count = np.bincount(owner[keep], minlength=len(ids))
        if count.min() == 0:
            missing = [image_id for image_id, i in position.items() if count[i] == 0][:3]
            raise InputError(f"{embedding_path}: no caption embedding for seed {split} image(s) {', '.join(missing)}")
        texts = info.column("caption").to_pylist()
        captions = [texts[i] for i in order]
        conditions = enc.tokenize(captions) if enc.mode == "tokens" else vectors[order].astype(np.float16)
        _save_conditions(tmp, conditions, count, captions)

    folder = _entry(paths, key, build)
    images = _images(
        paths, path, sha, lambda: read_table(path, IMAGE_SCHEMA, columns=["image"]).column("image").to_pylist(), enc
    )
    return _set([images], folder), json.loads((folder / "captions.json").read_text())
