"""Every GPU path once, each against its ceiling measured in the same run (issue 17), on one CUDA GPU.

    python bench/gpu.py [--small]

- embed: filter.embed.embed_images on synthetic 500x375 JPEGs (GPU decoding, the model's transforms on the GPU,
  pHashes in DataLoader workers) ÷ the model alone on preprocessed tensors already on the GPU; ViT-B-32 with random
  weights (open_clip, no download) at 224 px, fp16 autocast as embed runs. Target ≥ 0.8.
- train: the trainer (train.trainer.train: accelerate, bf16, EMA, clipping, its data path from a memory-mapped
  latent set) on a DiT-L/2-like config (24 blocks, width 1024, 4 x 32 x 32 latents, batch 64) ÷ a bare loop of the
  same model, optimizer and precision on tensors already on the GPU. Steps/s from the difference of two run lengths,
  so start-up and the final save cancel. Target ≥ 0.9.
- curate: the curate core on bench/curate_scale.py's synthetic 1M crawl with the device given to it (text
  extrapolation on the GPU). faiss searches and k-means use the GPU only with faiss-gpu, a wheel too large to bring
  to a lent machine: the json records which faiss ran.
Finishes in a few minutes on one GPU; needs CUDA torch and this project's dependencies only. Without CUDA it says so
and exits 0 (CI runs --small on CPU machines). Writes bench/results/gpu.json.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DIT_L2 = {
    "resolution": 256,
    "backbone": "dit",
    "dit": {"patch_size": 2, "num_layers": 24, "num_attention_heads": 16, "attention_head_dim": 64},
    "conditioning": "pooled",
    "condition_tokens": 4,
    "cross_attention_dim": 1024,
    "batch_size": 64,
    "mixed_precision": "bf16",
    "monitor_samples": 0,
}
LATENT = (4, 32, 32)  # sd-vae-ft-ema's latents of 256 px images


def synchronized(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def jpegs(n: int, rng: np.random.Generator) -> list[bytes]:
    from PIL import Image

    out = []
    for _ in range(n):
        pixels = np.cumsum(rng.normal(size=(375 // 5, 500 // 5, 3)), axis=1)
        pixels = ((pixels - pixels.min()) / np.ptp(pixels) * 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).resize((500, 375), Image.Resampling.BILINEAR).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def embed(device: torch.device, images: int, batch_size: int, workers: int) -> dict:
    from dextra.filter.clip import create, decode_pixels, preprocess_pixels
    from dextra.filter.embed import embed_images

    bundle = create("ViT-B-32", None, device)
    bundle.model.eval()
    encoded = jpegs(images, np.random.default_rng(0))
    pixels = preprocess_pixels(bundle.preprocess, [decode_pixels(b) for b in encoded[:batch_size]]).to(device)
    autocast = torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda")
    embed_images(bundle, encoded[:batch_size], batch_size, 0)  # warm-up: kernels, nvJPEG handles
    with torch.no_grad(), autocast:
        bundle.model.encode_image(pixels)
        started = synchronized(device)
        for _ in range(images // batch_size):
            bundle.model.encode_image(pixels)
        model_rate = images // batch_size * batch_size / (synchronized(device) - started)
    started = synchronized(device)
    embed_images(bundle, encoded, batch_size, workers)
    stage_rate = images / (synchronized(device) - started)
    return {
        "images": images,
        "batch_size": batch_size,
        "num_workers": workers,
        "stage_images_per_s": round(stage_rate, 1),
        "model_only_images_per_s": round(model_rate, 1),
        "ratio": round(stage_rate / model_rate, 3),
    }


def _params(steps: int):
    from dextra.pipeline.params import load_params, merged, parse_params

    raw = load_params(ROOT / "params.yaml").model_dump(mode="json")
    overrides = {
        "train": {**DIT_L2, "checkpoint_every": 10 * steps},  # no checkpoint but the final save
        "pretrain": {"steps": steps, "lr": 1e-4, "warmup_steps": 10},
    }
    return parse_params(merged(raw, overrides))


def _model(params):
    from dextra.train.model import ConditionProjector, build_denoiser

    cfg = params.train
    condition = ConditionProjector(512, cfg.cross_attention_dim, cfg.condition_tokens, mode=cfg.conditioning)
    return build_denoiser(cfg, condition, LATENT[0], LATENT[1])


def _trainer_seconds(steps: int, data, folder: Path) -> float:
    from dextra.pipeline.paths import Paths
    from dextra.train.trainer import make_accelerator, train

    params = _params(steps)
    accelerator = make_accelerator(params)
    model = _model(params)
    started = time.perf_counter()
    train(accelerator, model, data, params.pretrain, params, Paths(folder), f"bench{steps}")
    return synchronized(accelerator.device) - started


def _bare_seconds(steps: int, device: torch.device) -> float:
    from diffusers import DDPMScheduler

    params = _params(steps)
    model = _model(params).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    batch = params.train.batch_size
    clean = torch.randn(batch, *LATENT, device=device)
    condition = torch.randn(batch, 512, device=device)
    null = torch.zeros(batch, dtype=torch.bool, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    started = synchronized(device)
    for _ in range(steps):
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, 1000, (batch,), device=device)
        with autocast:
            prediction = model(scheduler.add_noise(clean, noise, timesteps), timesteps, condition, null)
        loss = torch.nn.functional.mse_loss(prediction.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return synchronized(device) - started


def training(device: torch.device, short: int, long: int, images: int) -> dict:
    from dextra.train.data import TrainingSet

    rng = np.random.default_rng(0)
    latents = rng.normal(size=(images, 1, *LATENT)).astype(np.float16)
    conditions = rng.normal(size=(images, 512)).astype(np.float32)
    conditions /= np.linalg.norm(conditions, axis=1, keepdims=True)
    data = TrainingSet([latents], conditions, np.arange(images), np.ones(images, np.int64), "bench-gpu")
    with tempfile.TemporaryDirectory(prefix="dextra-bench-gpu-") as folder:
        trainer = (long - short) / (
            _trainer_seconds(long, data, Path(folder)) - _trainer_seconds(short, data, Path(folder))
        )
    bare = (long - short) / (_bare_seconds(long, device) - _bare_seconds(short, device))
    return {
        "config": "DiT-L/2-like, 4x32x32 latents, batch 64, bf16",
        "steps": [short, long],
        "trainer_steps_per_s": round(trainer, 3),
        "synthetic_steps_per_s": round(bare, 3),
        "ratio": round(trainer / bare, 3),
    }


def curate_on(device: torch.device, n_crawl: int) -> dict:
    import faiss

    sys.path.insert(0, str(ROOT / "bench"))
    from curate_scale import synthetic

    from dextra.filter.curate import curate
    from dextra.filter.index import gpus
    from dextra.pipeline.params import CurateParams

    with tempfile.TemporaryDirectory(prefix="dextra-bench-gpu-") as folder:
        seed, crawl = synthetic(n_crawl, np.random.default_rng(0), Path(folder))
        started = time.perf_counter()
        decisions, extrapolation, _ = curate(seed, crawl, CurateParams(), 0, device)
        seconds = synchronized(device) - started
    return {
        "crawled": n_crawl,
        "seconds": round(seconds, 1),
        "kept": int(len(extrapolation.rows)),
        "faiss": f"faiss {faiss.__version__}, {gpus()} GPU(s) seen"
        + ("" if gpus() else " (faiss-cpu: searches and k-means on the CPU)"),
        "cpu_cores": os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--small", action="store_true", help="fewer images and steps, 100k crawled; bench/results/small/"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu.py: torch sees no CUDA device; nothing measured")
        return
    device = torch.device("cuda")
    small = args.small
    result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__}
    result["embed"] = embed(device, 2_048 if small else 16_384, 256, min(8, os.cpu_count() or 1))
    print(f"embed: stage ÷ model only {result['embed']['ratio']:.2f} ({result['embed']})", flush=True)
    result["train"] = training(device, 10, 30 if small else 110, 4_096)
    print(f"train: trainer ÷ synthetic steps/s {result['train']['ratio']:.2f} ({result['train']})", flush=True)
    result["curate"] = curate_on(device, 100_000 if small else 1_000_000)
    print(f"curate: {result['curate']}", flush=True)
    from dextra.pipeline.atomic import write_json
    from dextra.pipeline.paths import Paths

    write_json(Paths(ROOT).bench_result("gpu", small), result)


if __name__ == "__main__":
    main()
