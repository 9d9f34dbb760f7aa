"""A prior from a caption's CLIP text embedding to a CLIP image embedding (DALL·E 2's diffusion prior, which Shifted
Diffusion builds on). A `conditioning: image` model is trained on image embeddings, which need no captions, but
CLIP puts the text and the image embeddings of one picture far apart (the modality gap): sampling such a model from
a caption should go through the prior instead of putting the text embedding where an image embedding belongs.

diffusers' PriorTransformer predicts the clean image embedding from a noised one, the timestep and the text
embedding; DDPMScheduler noises it for training and DDIMScheduler samples it. Image embeddings are standardised per
dimension with the training pairs' mean and spread (PriorTransformer's clip_mean / clip_std), so that they are on
the noise's scale. Trained on the seed set's (caption, image) pairs and on the curated extra set's (extrapolated
text, image) pairs: the extrapolated text feature is exactly what stands in for a caption there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, PriorTransformer

from dextra.pipeline.atomic import atomic_path
from dextra.pipeline.device import autocast
from dextra.pipeline.errors import InputError
from dextra.pipeline.params import PriorParams
from dextra.pipeline.paths import Paths
from dextra.pipeline.shards import CURATED_SCHEMA, read_embeddings, read_tables, shard_files
from dextra.train.data import vectors_by_id

TRAIN_STEPS = 1000  # the noise schedule's length (DDPM's)


@dataclass
class EmbeddingPairs:
    """Row i: a text embedding and the CLIP image embedding of the image it describes (float32, L2-normalised)."""

    text: np.ndarray
    image: np.ndarray

    def __len__(self) -> int:
        return len(self.text)

    def __add__(self, other: EmbeddingPairs) -> EmbeddingPairs:
        return EmbeddingPairs(np.concatenate([self.text, other.text]), np.concatenate([self.image, other.image]))


def seed_pairs(paths: Paths, split: str) -> EmbeddingPairs:
    """Every caption of a seed split with its image's embedding."""
    captions, text = read_embeddings([paths.embedding_file("seed_captions", split)])
    image = vectors_by_id(
        [paths.embedding_file("seed_images", split)],
        captions.column("id").to_pylist(),
        paths.embedding_file("seed_images", split),
    )
    return EmbeddingPairs(text, image.astype(np.float32))


def extra_pairs(paths: Paths) -> EmbeddingPairs:
    """Every curated extra image's extrapolated text embedding with its CLIP image embedding."""
    files = shard_files(paths.curated_shards)
    if not files:
        raise InputError(f"{paths.curated_shards}: no curated shards (*.parquet); run `dextra curate` first")
    table = read_tables(files, CURATED_SCHEMA, columns=["id", "text_embedding"])
    text = np.asarray(table.column("text_embedding").to_pylist(), np.float32).reshape(table.num_rows, -1)
    crawl = shard_files(paths.embeddings / "crawl_images")
    image = vectors_by_id(crawl, table.column("id").to_pylist(), paths.embeddings / "crawl_images")
    return EmbeddingPairs(F.normalize(torch.from_numpy(text), dim=-1).numpy(), image.astype(np.float32))


def build(dim: int, cfg: PriorParams) -> PriorTransformer:
    """Four tokens: the text embedding, the timestep, the noised image embedding and the learnt query that reads out
    the prediction (no per-token text states)."""
    return PriorTransformer(
        num_attention_heads=cfg.num_attention_heads,
        attention_head_dim=cfg.attention_head_dim,
        num_layers=cfg.num_layers,
        embedding_dim=dim,
        num_embeddings=0,
        additional_embeddings=4,
        encoder_hid_proj_type=None,
        norm_in_type="layer",
        embedding_proj_norm_type="layer",
        clip_embed_dim=dim,
    )


def noise_scheduler() -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=TRAIN_STEPS, beta_schedule="squaredcos_cap_v2", prediction_type="sample", clip_sample=False
    )


def train_prior(
    pairs: EmbeddingPairs, cfg: PriorParams, seed: int, device: torch.device, log=None
) -> tuple[PriorTransformer, DDPMScheduler]:
    """`log(step, loss)` every 50 steps."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    text, image = torch.from_numpy(pairs.text), torch.from_numpy(pairs.image)
    model = build(text.shape[1], cfg)
    with torch.no_grad():
        model.clip_mean.copy_(image.mean(0, keepdim=True))
        model.clip_std.copy_(image.std(0, keepdim=True).clamp_min(1e-4))
    model.clip_mean.requires_grad_(False)
    model.clip_std.requires_grad_(False)
    model.to(device).train()
    scheduler = noise_scheduler()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0, fused=True
    )
    for step in range(cfg.steps):
        index = torch.randint(len(pairs), (min(cfg.batch_size, len(pairs)),), generator=generator)
        target = ((image[index].to(device) - model.clip_mean) / model.clip_std).detach()
        noise = torch.randn(target.shape, generator=generator).to(device)
        timesteps = torch.randint(TRAIN_STEPS, (len(index),), generator=generator).to(device)
        noised = scheduler.add_noise(target, noise, timesteps)
        with autocast(device):
            predicted = model(noised, timesteps, proj_embedding=text[index].to(device)).predicted_image_embedding
        loss = F.mse_loss(predicted.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if log is not None and (step % 50 == 0 or step == cfg.steps - 1):
            log(step, loss.item())
    return model.eval(), scheduler


@torch.no_grad()
def sample_prior(
    model: PriorTransformer, scheduler: DDPMScheduler, text: torch.Tensor, steps: int, seed: int, candidates: int = 1
) -> torch.Tensor:
    """L2-normalised image embeddings drawn for text embeddings (N, d), with DDIM in `steps` steps; of `candidates`
    draws per text, the one most similar to the text embedding (DALL·E 2 draws two)."""
    sampler = DDIMScheduler.from_config(scheduler.config)
    sampler.set_timesteps(steps)
    device = model.clip_mean.device
    text = text.to(device, torch.float32)
    repeated = text.repeat(candidates, 1)  # candidate c of text i is row c * N + i
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(repeated.shape, generator=generator).to(device)
    for t in sampler.timesteps:
        timesteps = torch.full((len(repeated),), int(t), device=device, dtype=torch.long)
        with autocast(device):
            predicted = model(sample, timesteps, proj_embedding=repeated).predicted_image_embedding
        sample = sampler.step(predicted.float(), t, sample).prev_sample
    drawn = F.normalize(model.post_process_latents(sample), dim=-1).view(candidates, len(text), -1)
    best = (drawn * F.normalize(text, dim=-1)).sum(-1).argmax(0)
    return drawn[best, torch.arange(len(text), device=device)]


def save_prior(model: PriorTransformer, scheduler: DDPMScheduler, folder: Path) -> None:
    with atomic_path(folder) as tmp:
        model.save_pretrained(tmp / "prior")
        scheduler.save_pretrained(tmp / "scheduler")


def load_prior(folder: Path, device: torch.device) -> tuple[PriorTransformer, DDPMScheduler]:
    if not (folder / "prior").is_dir():
        raise InputError(f"{folder}: no prior (a conditioning: image model samples through it: run `dextra prior`)")
    model = PriorTransformer.from_pretrained(folder / "prior").to(device).eval()
    return model, DDPMScheduler.from_pretrained(folder / "scheduler")


def embedding_errors(predicted: np.ndarray, pairs: EmbeddingPairs) -> dict[str, float]:
    """How far predicted image embeddings are from the true ones: mean cosine distance, and how often the true
    image is the nearest of the set's distinct images (retrieval top-1)."""
    predicted = np.asarray(predicted, np.float32)
    distance = float(np.mean(1 - np.sum(predicted * pairs.image, axis=1)))
    images, owner = np.unique(pairs.image, axis=0, return_inverse=True)
    top1 = float(np.mean(np.argmax(predicted @ images.T, axis=1) == owner.reshape(-1)))
    return {"cosine_distance": distance, "retrieval_top1": top1}
