"""Training sets held in memory: images decoded and resized once, so the step loop only indexes tensors.

Both sets have the same shape: a curated web image has one condition (its extrapolated text embedding), a seed
image one per caption; a batch picks one of an image's conditions at random each time it is drawn.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from dextra.pipeline.errors import InputError
from dextra.pipeline.paths import Paths
from dextra.pipeline.shards import CURATED_FIELDS, IMAGE_SCHEMA, read_embeddings, read_table, read_tables, shard_files


@dataclass
class ConditionedImages:
    """uint8 images (N, 3, R, R); image i's conditions are rows first[i] : first[i] + count[i] of `conditions`."""

    images: torch.Tensor
    conditions: torch.Tensor
    first: torch.Tensor
    count: torch.Tensor

    def batch(self, size: int, generator: torch.Generator, random_flip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Random images in [-1, 1], each with one of its conditions; half of them mirrored when `random_flip`."""
        index = torch.randint(len(self.images), (size,), generator=generator)
        rows = self.first[index] + (torch.rand(size, generator=generator) * self.count[index]).long()
        pixels = self.images[index].float() / 127.5 - 1
        flip = (torch.rand(size, generator=generator) < 0.5) & random_flip
        return torch.where(flip[:, None, None, None], pixels.flip(-1), pixels), self.conditions[rows]


def decode_images(blobs: Sequence[bytes], resolution: int, where: Path) -> torch.Tensor:
    """Centre-crop to a square and resize, as uint8 (N, 3, R, R)."""
    out = np.empty((len(blobs), resolution, resolution, 3), np.uint8)
    for i, blob in enumerate(blobs):
        try:
            image = Image.open(io.BytesIO(blob)).convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise InputError(f"{where}: row {i} is not a readable image ({exc})") from None
        out[i] = np.asarray(ImageOps.fit(image, (resolution, resolution), Image.Resampling.BICUBIC))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def load_curated(paths: Paths, resolution: int) -> ConditionedImages:
    """The curated extra set, conditioned on its extrapolated text embeddings."""
    folder = paths.curated_shards
    files = shard_files(folder)
    if not files:
        raise InputError(f"{folder}: no curated shards (*.parquet); run `dextra curate` first")
    schema = pa.schema([IMAGE_SCHEMA.field("image"), *CURATED_FIELDS])
    table = read_tables(files, schema, columns=["image", "text_embedding"])
    if table.num_rows == 0:
        raise InputError(f"{folder}: the curated shards hold no images; nothing to pretrain on")
    column = table.column("text_embedding").combine_chunks()
    lengths = pc.list_value_length(column).to_numpy()
    if lengths.min() == 0 or lengths.min() != lengths.max():
        raise InputError(f"{folder}: column 'text_embedding' must have one length in every row (got {lengths.min()}..{lengths.max()})")
    conditions = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(lengths), -1)
    n = table.num_rows
    return ConditionedImages(
        images=decode_images(table.column("image").to_pylist(), resolution, folder),
        conditions=torch.from_numpy(conditions),
        first=torch.arange(n),
        count=torch.ones(n, dtype=torch.long),
    )


def load_seed(paths: Paths, split: str, resolution: int) -> tuple[ConditionedImages, list[str]]:
    """A seed split conditioned on its caption embeddings; also the caption text of every condition row."""
    table = read_table(paths.seed_split(split), columns=["id", "image"])
    embedding_path = paths.embedding_file("seed_captions", split)
    if not embedding_path.exists():
        raise InputError(f"{embedding_path}: not found (run `dextra embed` first)")
    info, vectors = read_embeddings([embedding_path])
    if "caption" not in info.column_names:
        raise InputError(f"{embedding_path}: missing column 'caption'")
    position = {image_id: i for i, image_id in enumerate(table.column("id").to_pylist())}
    owner = np.array([position.get(image_id, -1) for image_id in info.column("id").to_pylist()], np.int64)
    keep = np.flatnonzero(owner >= 0)
    order = keep[np.argsort(owner[keep], kind="stable")]
    count = np.bincount(owner[keep], minlength=len(position))
    if not position:
        raise InputError(f"{paths.seed_split(split)}: no images")
    if count.min() == 0:
        missing = [image_id for image_id, i in position.items() if count[i] == 0][:3]
        raise InputError(f"{embedding_path}: no caption embedding for seed {split} image(s) {', '.join(missing)}")
    captions = info.column("caption").to_pylist()
    data = ConditionedImages(
        images=decode_images(table.column("image").to_pylist(), resolution, paths.seed_split(split)),
        conditions=torch.from_numpy(vectors[order]),
        first=torch.from_numpy(np.cumsum(count) - count),
        count=torch.from_numpy(count),
    )
    return data, [captions[i] for i in order]
