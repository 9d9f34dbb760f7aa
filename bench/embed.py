"""Embedding throughput of the `embed` stage against the model alone, in one run.

    python bench/embed.py [--root .] [--repeats 3]

stage: filter.embed.embed_images on encoded crawled images (decode, preprocess and pHash a batch at a time, in
DataLoader workers when embed.num_workers > 0, then the forward pass); model only: the same model, batch size and
device on preprocessed tensors already in memory. Ratio = stage images/s ÷ model-only images/s (issue 4's target:
≥ 0.8 on CPU with the demo model).
Writes bench/results/embed.json.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from dextra.filter.clip import decode_pixels, load_clip, preprocess_pixels
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
    pixels = preprocess_pixels(bundle.preprocess, [decode_pixels(b) for b in images])
    batch = params.embed.batch_size
    stage, model = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        embed_images(bundle, images, batch, params.embed.num_workers)
        stage.append(len(images) / (time.perf_counter() - started))
        model.append(model_only(bundle, pixels, batch))
    result = {
        "images": len(images),
        "batch_size": batch,
        "num_workers": params.embed.num_workers,
        "device": str(bundle.device),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "stage_images_per_s": round(statistics.median(stage), 1),
        "model_only_images_per_s": round(statistics.median(model), 1),
    }
    result["ratio"] = round(result["stage_images_per_s"] / result["model_only_images_per_s"], 3)
    print(
        f"embed stage {result['stage_images_per_s']:.0f} images/s, "
        f"model only {result['model_only_images_per_s']:.0f} images/s, ratio {result['ratio']:.2f}"
    )
    write_json(paths.bench_result("embed", args.small), result)


if __name__ == "__main__":
    main()
