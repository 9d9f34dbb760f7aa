"""The one training loop, shared by pretrain and finetune (DiT's train.py, built from diffusers' parts).

MSE on the noise ε or the velocity v (train.prediction_type) under a DDPM noise schedule, AdamW with linear
warm-up, gradient clipping and an EMA of the weights. The condition is swapped for NULL with probability
train.condition_dropout so the same model can give the unconditional prediction that NULL guidance needs.
`accelerate launch` runs it on several processes: each draws its own batches (batch_size is per process) and
DDP averages the gradients.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from dvclive import Live
from tqdm import tqdm

from dextra.pipeline.atomic import atomic_path
from dextra.pipeline.device import pick_device
from dextra.pipeline.params import Params, PhaseParams
from dextra.pipeline.paths import Paths

from .data import ConditionedImages
from .model import Denoiser


def train(model: Denoiser, data: ConditionedImages, phase: PhaseParams, params: Params, paths: Paths, name: str) -> dict:
    """Train `model` for phase.steps steps and save its EMA weights (and noise schedule) to models/<name>."""
    cfg = params.train
    accelerator = Accelerator(cpu=pick_device(params.device).type == "cpu")
    set_seed(params.seed + accelerator.process_index)
    generator = torch.Generator().manual_seed(params.seed + accelerator.process_index)
    noise_scheduler = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, prediction_type=cfg.prediction_type)
    optimizer = torch.optim.AdamW(model.parameters(), lr=phase.lr, weight_decay=0.0)
    lr_schedule = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=phase.warmup_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = EMAModel(model.parameters(), decay=cfg.ema_decay)
    ema.to(accelerator.device)
    live = Live(dir=str(paths.live(name)), save_dvc_exp=False, dvcyaml=None) if accelerator.is_main_process else None

    device, batch = accelerator.device, cfg.batch_size
    running, logged_loss = torch.zeros((), device=device), float("nan")
    model.train()
    started = time.perf_counter()
    progress = tqdm(range(1, phase.steps + 1), desc=name, unit="step", disable=not accelerator.is_main_process)
    for step in progress:
        clean, condition = (t.to(device) for t in data.batch(batch, generator, cfg.random_flip))
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, cfg.num_train_timesteps, (batch,), device=device)
        null = torch.rand(batch, device=device) < cfg.condition_dropout
        prediction = model(noise_scheduler.add_noise(clean, noise, timesteps), timesteps, condition, null)
        target = noise if cfg.prediction_type == "epsilon" else noise_scheduler.get_velocity(clean, noise, timesteps)
        loss = F.mse_loss(prediction, target)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(model.parameters())
        running += loss.detach()
        if step % cfg.log_every == 0 or step == phase.steps:
            logged_loss = accelerator.reduce(running, "mean").item() / ((step - 1) % cfg.log_every + 1)
            running.zero_()
            progress.set_postfix(loss=f"{logged_loss:.4f}")
            if live is not None:
                live.step = step  # x axis of the loss plot = training step, not log index
                live.log_metric("loss", logged_loss)
                live.log_metric("lr", lr_schedule.get_last_lr()[0])
                live.next_step()
    seconds = time.perf_counter() - started

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(model)
        ema.copy_to(final.parameters())
        with atomic_path(paths.model(name)) as tmp:
            final.save(tmp)
            noise_scheduler.save_pretrained(tmp / "scheduler")
        live.end()
    return {
        "steps": phase.steps,
        "images": len(data.images),
        "final_loss": round(logged_loss, 5),
        "seconds": round(seconds, 1),
        "images_per_s": round(phase.steps * batch * accelerator.num_processes / seconds, 1),
        "model": str(paths.model(name)),
    }
