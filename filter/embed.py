"""Embedding encoded images with a CLIP model, a batch at a time: decoded, preprocessed and perceptually hashed
together (the pHash is computed here because the image is decoded here anyway).

On CUDA the JPEGs are decoded and preprocessed on the GPU (filter/clip.py decode_on): PIL decoding and resizing
manage about 380 images/s per CPU core, a fraction of what the GPU embeds. The pHashes stay Pillow's, computed in
the DataLoader workers from a reduced decode (Image.draft: libjpeg scales the DCT, greyscale only, about half the
cost of a full decode), so a hash can differ from the full decode's by a few bits of 64; on the CPU nothing changes."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dextra.filter.clip import ClipBundle, decode_on, decode_pixels, preprocess_pixels
from dextra.filter.dedup import HASH_BYTES, phashes
from dextra.pipeline.shards import read_table, write_embeddings

HASH_DRAFT_SIDE = 128  # the reduced decode pHashes take on the GPU path: at least 4x the 32 px the hash resizes to


def _draft_gray(image_bytes: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(image_bytes))
    image.draft("L", (HASH_DRAFT_SIDE, HASH_DRAFT_SIDE))  # JPEG only; other formats decode in full
    return image.convert("L")


class _ShardBatches(Dataset):
    """One batch per item, decoded, preprocessed and hashed together (in the DataLoader's workers when
    embed.num_workers > 0): with a small model, per-image Python overhead, not the forward pass, bounds the stage.
    With `on_device`, only hashed: the encoded images go on to be decoded on the device."""

    def __init__(self, images: list[bytes], preprocess, batch_size: int, on_device: bool):
        self.images, self.preprocess, self.batch_size, self.on_device = images, preprocess, batch_size, on_device

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | list[bytes], np.ndarray]:
        encoded = self.images[i * self.batch_size : (i + 1) * self.batch_size]
        if self.on_device:
            return encoded, phashes([_draft_gray(b) for b in encoded])
        pixels = [decode_pixels(b) for b in encoded]
        grays = [Image.fromarray(p.permute(1, 2, 0).numpy()).convert("L") for p in pixels]
        return preprocess_pixels(self.preprocess, pixels), phashes(grays)


@torch.no_grad()
def embed_images(
    bundle: ClipBundle,
    images: list[bytes],
    batch_size: int = 256,
    num_workers: int = 0,
    decode_on_device: bool | None = None,
) -> tuple[np.ndarray, list[bytes]]:
    """L2-normalised CLIP embeddings (n, d) and pHashes of encoded images. `decode_on_device` (default: on CUDA)
    decodes and preprocesses on the model's device (tests run that path on the CPU)."""
    on_device = bundle.device.type == "cuda" if decode_on_device is None else decode_on_device
    batches = _ShardBatches(images, bundle.preprocess, batch_size, on_device)
    loader = DataLoader(batches, batch_size=None, num_workers=num_workers)
    autocast = torch.autocast("cuda", dtype=torch.float16, enabled=bundle.device.type == "cuda")
    out, hashes = [], []
    for batch, batch_hashes in loader:
        if on_device:
            pixels = preprocess_pixels(bundle.preprocess, decode_on(bundle.device, batch))
        else:
            pixels = batch.to(bundle.device, non_blocking=True)
        with autocast:
            features = bundle.model.encode_image(pixels)
        out.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy())
        hashes += [h.tobytes() for h in np.asarray(batch_hashes)]
    return (np.concatenate(out) if out else np.zeros((0, bundle.embed_dim), np.float32)), hashes


def embed_shard(bundle: ClipBundle, kind: str, source: Path, target: Path, batch_size: int, num_workers: int) -> int:
    """Embed one input shard into `target`: a seed split's captions (`seed_captions`) or its images (any other
    kind); returns the number of vectors written."""
    if kind == "seed_captions":
        table = read_table(source, columns=["id", "captions"])
        ids, captions = [], []
        for image_id, texts in zip(table.column("id").to_pylist(), table.column("captions").to_pylist()):
            ids += [image_id] * len(texts)
            captions += texts
        write_embeddings(target, ids, bundle.encode_texts(captions, batch_size), extra={"caption": captions})
        return len(captions)
    table = read_table(source, columns=["id", "image"])
    vectors, hashes = embed_images(bundle, table.column("image").to_pylist(), batch_size, num_workers)
    write_embeddings(
        target, table.column("id").to_pylist(), vectors, extra={"phash": pa.array(hashes, pa.binary(HASH_BYTES))}
    )
    return table.num_rows
