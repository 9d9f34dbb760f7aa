"""Training throughput of `dextra pretrain` against a plain loop written the way diffusers' train_text_to_image
example does it, in one run, on the same model config, data, batch size and device.

    python bench/train.py [--root .] [--steps 100] [--rounds 2] [--threads N]

The data are the demo's curated extra set and CLIP model (run `dvc repro curate` first), copied to a temporary
folder so nothing of the repository is touched. The model is params.yaml's train section, measured twice:
- pixels: as the demo trains (train.resolution, no VAE);
- latents: on the stored 64 px images through a small AutoencoderKL (train.vae), as the paper trains in latents.

- dextra: `dextra pretrain` itself (pretrain.run), with its checkpoint and sample grid every train.checkpoint_every
  steps. Images (or latents) come from the memory-mapped cache and conditions are the extrapolated text embeddings
  stored there: nothing is decoded, encoded by the VAE or by a text encoder while it trains. The first run builds
  the cache; its wall time is reported apart.
- baseline: a torch Dataset decoding each image with PIL and applying torchvision transforms per sample (Resize,
  CenterCrop, ToTensor, Normalize) in a DataLoader (the example's default num_workers=0), the caption tokenized per
  sample, and per batch the VAE encoding the images and CLIP's text encoder encoding the captions (each extra
  image's best-matched neighbour caption, to the pooled embedding the model takes); accelerate's `accumulate`,
  AdamW, clipping, an EMA and the loss gathered each step, as in the example.
Rounds alternate the two, and the median images/s of each is compared (the machine may be shared).
Writes bench/results/train.json under --root.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import AutoencoderKL, DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from dextra.filter.clip import load_clip
from dextra.pipeline.atomic import write_json
from dextra.pipeline.device import pick_device
from dextra.pipeline.errors import DextraError, InputError
from dextra.pipeline.params import Params, load_params
from dextra.pipeline.paths import Paths
from dextra.pipeline.shards import CURATED_SCHEMA, read_tables, shard_files
from dextra.pipeline.stages import pretrain
from dextra.train.model import ConditionProjector, build_denoiser, load_vae, vae_downscale


class CaptionedImages(Dataset):
    """The example's dataset: encoded images and captions, decoded and transformed per sample."""

    def __init__(self, folder: Path, resolution: int, tokenizer):
        table = read_tables(
            shard_files(folder), CURATED_SCHEMA, columns=["image", "neighbor_captions", "neighbor_weights"]
        )
        self.images = table.column("image").to_pylist()
        weights = table.column("neighbor_weights").to_pylist()
        self.captions = [c[int(np.argmax(w))] for c, w in zip(table.column("neighbor_captions").to_pylist(), weights)]
        self.tokenizer = tokenizer
        self.transform = transforms.Compose(
            [
                transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
                transforms.CenterCrop(resolution),
                transforms.ToTensor(),
                transforms.Normalize([0.5], [0.5]),
            ]
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        image = Image.open(io.BytesIO(self.images[i])).convert("RGB")
        return {"pixel_values": self.transform(image), "input_ids": self.tokenizer([self.captions[i]])[0]}


def baseline(params: Params, paths: Paths, steps: int) -> dict:
    """diffusers' train_text_to_image loop, on the same denoiser (and VAE, in latent space)."""
    cfg = params.train
    accelerator = Accelerator(cpu=pick_device(params.device).type == "cpu")
    clip = load_clip(paths.clip, accelerator.device)
    text_encoder = clip.model.eval().requires_grad_(False)
    vae = load_vae(cfg.vae).to(accelerator.device) if cfg.vae else None
    dataset = CaptionedImages(paths.curated_shards, cfg.resolution, clip.tokenizer)
    loader = DataLoader(
        dataset,
        shuffle=True,
        batch_size=cfg.batch_size,
        num_workers=0,
        drop_last=True,
        collate_fn=lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]},
    )
    torch.manual_seed(params.seed)
    condition = ConditionProjector(clip.embed_dim, cfg.cross_attention_dim, cfg.condition_tokens)
    model = build_denoiser(
        cfg,
        condition,
        *((vae.config.latent_channels, cfg.resolution // vae_downscale(vae)) if vae else (3, cfg.resolution)),
    )
    noise_scheduler = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, prediction_type=cfg.prediction_type)
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.pretrain.lr)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=params.pretrain.warmup_steps)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    ema = EMAModel(model.parameters(), decay=cfg.ema_decay)
    model.train()
    done, started = 0, time.perf_counter()
    while done < steps:
        for batch in loader:
            with accelerator.accumulate(model):
                clean = batch["pixel_values"]
                with torch.no_grad():
                    if vae is not None:
                        clean = vae.encode(clean).latent_dist.sample() * vae.config.scaling_factor
                    condition = F.normalize(text_encoder.encode_text(batch["input_ids"]), dim=-1)
                noise = torch.randn_like(clean)
                timesteps = torch.randint(0, cfg.num_train_timesteps, (len(clean),), device=clean.device)
                null = torch.rand(len(clean), device=clean.device) < cfg.condition_dropout
                prediction = model(noise_scheduler.add_noise(clean, noise, timesteps), timesteps, condition, null)
                loss = F.mse_loss(prediction.float(), noise_scheduler.get_velocity(clean, noise, timesteps))
                accelerator.gather(loss.repeat(len(clean))).mean().item()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                ema.step(model.parameters())
                done += 1
                if done == steps:
                    break
    seconds = time.perf_counter() - started
    return {"images_per_s": steps * cfg.batch_size / seconds, "seconds": seconds}


def dextra(params: Params, paths: Paths) -> dict:
    """`dextra pretrain`, from no checkpoint (the cache stays)."""
    shutil.rmtree(paths.checkpoints("pretrain"), ignore_errors=True)
    started = time.perf_counter()
    summary = pretrain.run(params, paths)
    return {
        "images_per_s": summary["images_per_s"],
        "seconds": summary["seconds"],
        "wall_s": time.perf_counter() - started,
        "images": summary["images"],
    }


def small_vae(folder: Path) -> Path:
    """A 3-level AutoencoderKL (64 px -> 4 x 16 x 16 latents), randomly initialised: no weights can be downloaded,
    and what is measured is its cost, not its quality (sd-vae-ft-ema is deeper and wider, so costs more)."""
    torch.manual_seed(0)
    AutoencoderKL(
        block_out_channels=[32, 64, 64],
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        latent_channels=4,
        sample_size=64,
    ).save_pretrained(folder)
    return folder


def measure(params: Params, paths: Paths, steps: int, rounds: int) -> dict:
    cold = dextra(params, paths)  # builds the cache
    runs: dict[str, list[dict]] = {"dextra": [], "baseline": []}
    for _ in range(rounds):
        runs["baseline"].append(baseline(params, paths, steps))
        runs["dextra"].append(dextra(params, paths))
    rate = {name: statistics.median(r["images_per_s"] for r in rs) for name, rs in runs.items()}
    print(
        f"{params.train.resolution} px, vae {params.train.vae}: dextra pretrain {rate['dextra']:.1f} images/s, "
        f"diffusers-style loop {rate['baseline']:.1f} images/s: {rate['dextra'] / rate['baseline']:.2f}x"
    )
    return {
        "resolution": params.train.resolution,
        "latent": params.train.vae is not None,
        "dextra_images_per_s": round(rate["dextra"], 1),
        "baseline_images_per_s": round(rate["baseline"], 1),
        "speedup": round(rate["dextra"] / rate["baseline"], 3),
        "dextra_first_run_wall_s": round(cold["wall_s"], 1),
        "images": cold["images"],
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per measured run")
    parser.add_argument("--rounds", type=int, default=2, help="measured runs of each, alternating")
    parser.add_argument(
        "--small", action="store_true", help="CI's size: 10 steps, one round; writes under bench/results/small/"
    )
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads for both (default: torch's)"
    )
    args = parser.parse_args()
    if args.small:
        args.steps, args.rounds = 10, 1
    torch.set_num_threads(args.threads)
    source = Paths(args.root)
    try:
        params = load_params(args.root / "params.yaml")
        if not shard_files(source.curated_shards) or not (source.clip / "model.json").exists():
            raise InputError(f"{source.curated_shards} and {source.clip}: needed; run `dvc repro curate` first")
        with tempfile.TemporaryDirectory(prefix="dextra-bench-") as tmp:
            paths = Paths(Path(tmp))
            shutil.copytree(source.curated_shards, paths.curated_shards)
            shutil.copytree(source.clip, paths.clip)
            # the checkpoint monitor samples for seed test captions: the split and its caption embeddings
            paths.seed.mkdir(parents=True)
            shutil.copy2(source.seed_split("test"), paths.seed_split("test"))
            shutil.copytree(source.embedding_folder("seed_captions"), paths.embedding_folder("seed_captions"))
            vae = small_vae(Path(tmp) / "vae")
            configs = {"pixels": {}, "latents": {"vae": str(vae), "resolution": 64}}
            results = {}
            for name, train in configs.items():
                raw = params.model_dump()
                raw["train"].update(train)
                raw["pretrain"].update(steps=args.steps)
                results[name] = measure(Params.model_validate(raw), paths, args.steps, args.rounds)
    except DextraError as exc:
        print(f"bench/train.py: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    write_json(
        source.bench_result("train", args.small),
        {
            "device": str(pick_device(params.device)),
            "torch_threads": args.threads,
            "cpu_cores": os.cpu_count(),
            "steps": args.steps,
            "batch_size": params.train.batch_size,
            "checkpoint_every": params.train.checkpoint_every,
            **results,
        },
    )


if __name__ == "__main__":
    main()
