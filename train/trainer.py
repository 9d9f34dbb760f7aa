"""The one training loop, shared by pretrain and finetune (DiT's train.py, built from diffusers' parts and accelerate).

MSE on ε or v (train.prediction_type) under a DDPM noise schedule; AdamW with linear warm-up, gradient accumulation
and clipping; an EMA of the weights. The condition is swapped for NULL with probability train.condition_dropout,
so the same model gives the unconditional prediction that NULL guidance needs.

Processes: under `accelerate launch` or `torchrun` every process runs this loop on its own slice of each global
batch (train.batch_size images per process and micro-batch) and DDP averages the gradients; only the main process
logs, samples and writes. Precision: bf16 autocast on CUDA (weights, optimizer state and EMA stay fp32), fp32 on CPU.

Every train.checkpoint_every steps a checkpoint is written (train/checkpoint.py). A run that finds one of its own
resumes from it: the weights, optimizer, schedule, EMA and RNG states come back, the data stream continues at the
saved position (train/data.py), and the loss history is replayed into dvclive, whose folder DVC empties before the
stage re-runs. On CPU the resumed run's losses equal the uninterrupted run's, step for step.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import AutoencoderKL, DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm import tqdm

from dextra.pipeline.atomic import atomic_path
from dextra.pipeline.device import pick_device
from dextra.pipeline.errors import ParamsError
from dextra.pipeline.params import Params, PhaseParams
from dextra.pipeline.paths import Paths
from dextra.train import checkpoint
from dextra.train.data import DataStream, Encoding, TrainingSet
from dextra.train.metrics import CheckpointMonitor
from dextra.train.model import Denoiser, build_condition, build_denoiser, image_resolution, load_vae, vae_downscale
from dextra.train.sampling import image_grid, sample, sampler
from dextra.train.text_encoder import caption_tokenizer
from dvclive import Live

# Params that change how a run is watched, not what it computes: a checkpoint stays resumable when they change.
BOOKKEEPING = {"log_every", "checkpoint_every", "checkpoints_kept", "grid_samples", "monitor_samples", "compile"}
GRID_STEPS, GRID_GUIDANCE = 20, 3.0  # checkpoint samples (grid, CLIP-FD monitor) are feedback, not evaluation


def make_accelerator(params: Params) -> Accelerator:
    """CUDA when present (params.device), with train.mixed_precision resolved for it."""
    cfg = params.train
    device = pick_device(params.device)
    precision = cfg.mixed_precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    elif precision == "fp16" and device.type != "cuda":
        raise ParamsError("train.mixed_precision: fp16 needs CUDA (its grad scaler has no CPU kernels); use no or bf16")
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what deterministic cuBLAS needs
    return Accelerator(
        cpu=device.type == "cpu", mixed_precision=precision, dynamo_backend="inductor" if cfg.compile else "no"
    )


def fresh_model(
    params: Params, paths: Paths, accelerator: Accelerator, load: Callable[[Encoding], TrainingSet]
) -> tuple[Denoiser, TrainingSet, AutoencoderKL | None]:
    """A new model as params.train describes it, with the data `load` reads in that model's encoding (also the
    seed-only baseline's start)."""
    cfg = params.train
    vae = load_vae(cfg.vae) if cfg.vae else None
    downscale = vae_downscale(vae) if vae else 1
    if cfg.resolution % downscale:
        raise ParamsError(
            f"train.resolution: {cfg.resolution} is not a multiple of the VAE's downscale factor {downscale} "
            "(train.vae)"
        )
    tokenizer = caption_tokenizer(cfg.text_encoder) if cfg.conditioning == "tokens" and cfg.text_encoder else None
    encoding = Encoding.create(
        paths, cfg.resolution, cfg.conditioning, vae, cfg.random_flip, accelerator.device, tokenizer
    )
    with accelerator.local_main_process_first():  # one process per machine decodes; the others read its cache
        data = load(encoding)
    set_seed(params.seed)
    condition = build_condition(cfg, data.condition_size, paths.clip)
    return (
        build_denoiser(cfg, condition, vae.config.latent_channels if vae else 3, cfg.resolution // downscale),
        data,
        vae,
    )


def train(
    accelerator: Accelerator,
    model: Denoiser,
    data: TrainingSet,
    phase: PhaseParams,
    params: Params,
    paths: Paths,
    name: str,
    *,
    vae: AutoencoderKL | None = None,
    init: str = "scratch",
    warm_start: bool = False,
) -> dict:
    """Train `model` until phase.steps and save its EMA weights (with noise schedule and VAE) to models/<name>.
    `init` names what the weights start from, for the run's fingerprint."""
    cfg = params.train
    device, main = accelerator.device, accelerator.is_main_process
    folder = paths.checkpoints(name)
    run = checkpoint.fingerprint(
        phase_name=name,
        seed=params.seed,
        data=data.key,
        init=init,
        train=cfg.model_dump(exclude=BOOKKEEPING),
        phase=phase.model_dump(exclude={"steps"}),
    )
    found = checkpoint.resumable(folder, run, phase.steps)
    if found is None and warm_start:
        _warm_start(model, folder)

    monitor = None
    if main and cfg.monitor_samples:
        monitor = CheckpointMonitor(
            paths, model.mode, image_resolution(model, vae), cfg.monitor_samples, params.seed, device, model.tokenizer
        )
    set_seed(params.seed, deterministic=cfg.deterministic)
    model.train_text_encoder(cfg.train_text_encoder)
    noise_scheduler = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, prediction_type=cfg.prediction_type)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=phase.lr, weight_decay=0.0, fused=True
    )
    # Stepped once per optimizer step by this loop, so warm-up counts steps whatever the number of processes.
    lr_schedule = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=phase.warmup_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = EMAModel(model.parameters(), decay=cfg.ema_decay, foreach=True)
    ema.to(device)
    accelerator.register_for_checkpointing(ema, lr_schedule)  # in this order: checkpoint.EMA_FILE is the first
    if vae is not None:
        vae.to(device)
    progress = checkpoint.Progress(run)
    if found is not None:
        checkpoint.load(accelerator, found[0])
        ema.to(device)  # accelerate loads registered objects onto the CPU
        progress = found[1]
    resumed_from = progress.step

    live = Live(dir=str(paths.live(name)), save_dvc_exp=False, dvcyaml=None) if main else None
    for logged in progress.history:  # DVC emptied dvclive/<name> before re-running the stage
        _log(live, *logged)
    for logged in progress.clip_fd:
        _log_clip_fd(live, *logged)

    world, rank, batch, accumulate = (
        accelerator.num_processes,
        accelerator.process_index,
        cfg.batch_size,
        cfg.gradient_accumulation_steps,
    )
    stream = DataStream(len(data), params.seed, name)
    grid_conditions = data.first_conditions(cfg.grid_samples).to(device)
    running, since_log = torch.zeros((), device=device), 0

    def generate(conditions: torch.Tensor) -> torch.Tensor:
        return _ema_samples(accelerator, model, ema, conditions.to(device), noise_scheduler, vae)

    model.train()
    bar = tqdm(total=phase.steps, initial=progress.step, desc=name, unit="step", disable=not main)
    started = time.perf_counter()
    while progress.step < phase.steps:
        for micro in range(accumulate):
            position = progress.position + rank * batch
            host, on_device = stream.generators(position, device)
            clean, condition = (
                t.to(device, non_blocking=True)
                for t in data.batch(stream.indices(position, batch), host, cfg.random_flip)
            )
            noise = torch.randn(clean.shape, generator=on_device, device=device)
            timesteps = torch.randint(0, cfg.num_train_timesteps, (batch,), generator=on_device, device=device)
            null = torch.rand(batch, generator=on_device, device=device) < cfg.condition_dropout
            # Gradients are averaged across processes only on the last micro-batch.
            with accelerator.no_sync(model) if micro < accumulate - 1 else contextlib.nullcontext():
                prediction = model(noise_scheduler.add_noise(clean, noise, timesteps), timesteps, condition, null)
                target = (
                    noise if cfg.prediction_type == "epsilon" else noise_scheduler.get_velocity(clean, noise, timesteps)
                )
                loss = F.mse_loss(prediction.float(), target) / accumulate
                accelerator.backward(loss)
            running += loss.detach()
            progress.position += world * batch
        accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(model.parameters())
        progress.step += 1
        since_log += 1
        bar.update()

        save = progress.step % cfg.checkpoint_every == 0 or progress.step == phase.steps
        if save or progress.step % cfg.log_every == 0:  # a checkpoint never holds a half-summed log line
            loss_value = accelerator.reduce(running, "mean").item() / since_log
            running.zero_()
            since_log = 0
            progress.history.append([progress.step, loss_value, lr_schedule.get_last_lr()[0]])
            _log(live, *progress.history[-1])
            rate = (progress.step - resumed_from) * batch * accumulate * world / (time.perf_counter() - started)
            bar.set_postfix(loss=f"{loss_value:.4f}", images_per_s=f"{rate:.0f}")
        if save:
            if main and cfg.grid_samples:
                live.log_image("samples.png", image_grid(generate(grid_conditions)))
            if monitor is not None:
                progress.clip_fd.append([progress.step, monitor.clip_fd(generate)])
                _log_clip_fd(live, *progress.clip_fd[-1])
            checkpoint.save(accelerator, folder, progress, cfg.checkpoints_kept)
    bar.close()
    seconds = time.perf_counter() - started

    accelerator.wait_for_everyone()
    if main:
        final = accelerator.unwrap_model(model)
        ema.copy_to(final.parameters())
        with atomic_path(paths.model(name)) as tmp:
            final.save(tmp)
            noise_scheduler.save_pretrained(tmp / "scheduler")
            if vae is not None:
                vae.save_pretrained(tmp / "vae")
        live.end()
    trained = progress.step - resumed_from
    return {
        "steps": progress.step,
        "resumed_from_step": resumed_from if found else None,
        "processes": world,
        "images": len(data),
        "final_loss": round(progress.history[-1][1], 5) if progress.history else None,
        "seconds": round(seconds, 1),
        "images_per_s": round(trained * batch * accumulate * world / seconds, 1) if trained else None,
        "model": str(paths.model(name)),
        "checkpoint": str(checkpoint.saved(folder)[-1]) if main else None,
    }


def _log(live: Live | None, step: int, loss: float, lr: float) -> None:
    if live is not None:
        live.step = step  # x axis of the loss plot = training step, not log index
        live.log_metric("loss", loss)
        live.log_metric("lr", lr)
        live.next_step()


def _log_clip_fd(live: Live | None, step: int, value: float) -> None:
    if live is not None:
        live.step = step
        live.log_metric("clip_fd", value)


def _warm_start(model: Denoiser, folder) -> None:
    """Load the EMA weights of the newest checkpoint in `folder` into `model` (nothing when there is none)."""
    found = checkpoint.newest_ema(folder)
    if found is None:
        return
    source, weights = found
    parameters = list(model.parameters())
    if [tuple(w.shape) for w in weights] != [tuple(p.shape) for p in parameters]:
        raise ParamsError(
            f"pretrain.warm_start: {source} holds a different model than params.train builds; "
            "set warm_start: false or restore the old train params"
        )
    with torch.no_grad():
        for parameter, weight in zip(parameters, weights):
            parameter.copy_(weight)


@torch.no_grad()
def _ema_samples(
    accelerator: Accelerator,
    model,
    ema: EMAModel,
    conditions: torch.Tensor,
    noise_scheduler: DDPMScheduler,
    vae: AutoencoderKL | None,
) -> torch.Tensor:
    """Samples of the EMA weights (main process only; the training weights are restored after)."""
    net = accelerator.unwrap_model(model)
    ema.store(net.parameters())
    ema.copy_to(net.parameters())
    net.eval()
    with accelerator.autocast():
        images = sample(
            net,
            sampler("ddim", noise_scheduler.config),
            conditions,
            GRID_STEPS,
            GRID_GUIDANCE,
            torch.Generator().manual_seed(0),
            vae,
        )
    net.train()
    ema.restore(net.parameters())
    return images.float()
