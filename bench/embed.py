"""Embedding throughput of the `embed` stage against the model alone, in one run.

    python bench/embed.py [--root .] [--repeats 3]

stage: filter.embed.embed_images on encoded crawled images (decode, preprocess and pHash a batch at a time, in
DataLoader workers when embed.num_workers > 0, then the forward pass); model only: the same model, batch size and
device on preprocessed tensors already in memory. Ratio = stage images/s ÷ model-only images/s (issue 4's target:
≥ 0.8 on CPU with the demo model). The same for ViT-B-32 (random weights, 224 px input) on the first
VIT_IMAGES crawled images, where the forward pass, not decoding, is most of the cost (issue 17).
Writes bench/results/embed.json.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from dextra.filter.clip import create, decode_pixels, load_clip, preprocess_pixels
from dextra.filter.embed import embed_images
from dextra.pipeline.atomic import write_json
from dextra.pipeline.device import pick_device
from dextra.pipeline.params import load_params
from dextra.pipeline.paths import Paths
from dextra.pipeline.shards import read_tables, shard_files


def model_only(bundle, pixels: torch.Tensor, batch_size: int) -> float:
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(pixels), batch_size):
            bundle.model.encode_image(pixels[start : start + batch_size].to(bundle.device))
    return len(pixels) / (time.perf_counter() - started)


VIT_IMAGES, VIT_BATCH = 512, 64


def measure(bundle, images: list[bytes], batch: int, num_workers: int, repeats: int) -> dict:
    pixels = preprocess_pixels(bundle.preprocess, [decode_pixels(b) for b in images])
    stage, model = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        embed_images(bundle, images, batch, num_workers)
        stage.append(len(images) / (time.perf_counter() - started))
        model.append(model_only(bundle, pixels, batch))
    result = {
        "images": len(images),
        "batch_size": batch,
        "num_workers": num_workers,
        "stage_images_per_s": round(statistics.median(stage), 1),
        "model_only_images_per_s": round(statistics.median(model), 1),
    }
    result["ratio"] = round(result["stage_images_per_s"] / result["model_only_images_per_s"], 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--small", action="store_true", help="the small size CI runs; writes under bench/results/small/"
    )
    args = parser.parse_args()
    repeats = 1 if args.small else args.repeats
    paths, params = Paths(Path(args.root)), load_params(Path(args.root) / "params.yaml")
    bundle = load_clip(paths.clip, pick_device(params.device))
    images = read_tables(shard_files(paths.crawl_shards), columns=["image"]).column("image").to_pylist()
    result = {
        **measure(bundle, images, params.embed.batch_size, params.embed.num_workers, repeats),
        "device": str(bundle.device),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
    }
    vit = create("ViT-B-32", None, bundle.device)
    vit.model.eval()
    result["vit_b_32"] = measure(
        vit, images[: VIT_BATCH if args.small else VIT_IMAGES], VIT_BATCH, params.embed.num_workers, repeats
    )
    for name, r in (("demo model", result), ("ViT-B-32 at 224 px", result["vit_b_32"])):
        print(
            f"{name}: embed stage {r['stage_images_per_s']:.0f} images/s, "
            f"model only {r['model_only_images_per_s']:.0f} images/s, ratio {r['ratio']:.2f}"
        )
    write_json(paths.bench_result("embed", args.small), result)


if __name__ == "__main__":
    main()
