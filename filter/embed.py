"""Embedding encoded images with a CLIP model, a batch at a time: decoded, preprocessed and perceptually hashed
together (the pHash is computed here because the image is decoded here anyway)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dextra.filter.clip import ClipBundle, decode_pixels, preprocess_pixels
from dextra.filter.dedup import HASH_BYTES, phashes
from dextra.pipeline.shards import read_table, write_embeddings


class _ShardBatches(Dataset):
    """One batch per item, decoded, preprocessed and hashed together (in the DataLoader's workers when
    embed.num_workers > 0): with a small model, per-image Python overhead, not the forward pass, bounds the stage."""

    def __init__(self, images: list[bytes], preprocess, batch_size: int):
        self.images, self.preprocess, self.batch_size = images, preprocess, batch_size

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, np.ndarray]:
        pixels = [decode_pixels(b) for b in self.images[i * self.batch_size : (i + 1) * self.batch_size]]
        grays = [Image.fromarray(p.permute(1, 2, 0).numpy()).convert("L") for p in pixels]
        return preprocess_pixels(self.preprocess, pixels), phashes(grays)


@torch.no_grad()
def embed_images(
    bundle: ClipBundle, images: list[bytes], batch_size: int = 256, num_workers: int = 0
) -> tuple[np.ndarray, list[bytes]]:
    """L2-normalised CLIP embeddings (n, d) and pHashes of encoded images."""
    batches = _ShardBatches(images, bundle.preprocess, batch_size)
    loader = DataLoader(batches, batch_size=None, num_workers=num_workers)
    autocast = torch.autocast("cuda", dtype=torch.float16, enabled=bundle.device.type == "cuda")
    out, hashes = [], []
    for pixels, batch_hashes in loader:
        with autocast:
            features = bundle.model.encode_image(pixels.to(bundle.device, non_blocking=True))
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
