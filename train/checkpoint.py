"""Checkpoints: checkpoints/<phase>/step-NNNNNNNN/, each enough to go on as if the run had never stopped.

A checkpoint is accelerate's save_state (model, optimizer, grad scaler when fp16, every process's python / numpy /
torch / CUDA RNG states) with the objects registered for it (the EMA, then the LR schedule), plus trainer.json: the
step, the data position, the logged loss history and the run's fingerprint. It is written into a temporary folder,
synced and renamed into place, so a kill leaves the whole checkpoint or none of it. checkpoints/<phase> is a
`persist: true` DVC out, which `dvc repro` never deletes before re-running the stage. Only a run with the same
fingerprint (the params that shape training, the data's content, the weights it starts from) resumes a checkpoint;
the first checkpoint of a new run deletes those of the old one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from dextra.pipeline.errors import InputError
from dextra.pipeline.shards import file_sha256

STATE = "trainer.json"
EMA_FILE = "custom_checkpoint_0.pkl"  # accelerate's file for the first object registered for checkpointing: the EMA


def fingerprint(**parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def folder_digest(folder: Path) -> str:
    """Content hash of a saved model folder (what finetune starts from)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder)} {file_sha256(path)}\n".encode())
    return digest.hexdigest()


@dataclass
class Progress:
    """What trainer.json holds; `position` counts the samples drawn by all processes so far."""

    fingerprint: str
    step: int = 0
    position: int = 0
    history: list[list[float]] = field(default_factory=list)  # [step, loss, lr] per log line
    clip_fd: list[list[float]] = field(default_factory=list)  # [step, CLIP-FD] per checkpoint with a monitor


def saved(folder: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    return sorted(p for p in folder.glob("step-*") if p.is_dir())


def read_progress(checkpoint: Path) -> Progress:
    try:
        return Progress(**json.loads((checkpoint / STATE).read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(
            f"{checkpoint / STATE}: unreadable ({exc}); delete {checkpoint} to resume from the checkpoint before it"
        ) from None


def resumable(folder: Path, run: str, max_step: int) -> tuple[Path, Progress] | None:
    """The newest checkpoint of run `run` at or before `max_step` (phase.steps may have grown since)."""
    for checkpoint in reversed(saved(folder)):
        progress = read_progress(checkpoint)
        if progress.fingerprint == run and progress.step <= max_step:
            return checkpoint, progress
    return None


def load(accelerator: Accelerator, checkpoint: Path) -> None:
    try:
        accelerator.load_state(str(checkpoint))
    except Exception as exc:  # a truncated tensor file, a bad pickle, a missing part: all mean the same to the user
        raise InputError(
            f"{checkpoint}: cannot be loaded ({type(exc).__name__}: {exc}); "
            "delete it to resume from the checkpoint before it"
        ) from None


def newest_ema(folder: Path) -> tuple[Path, list[torch.Tensor]] | None:
    """The EMA weights of the newest checkpoint in `folder` (pretrain.warm_start), or None when there is none."""
    found = saved(folder)
    if not found:
        return None
    try:
        return found[-1], torch.load(found[-1] / EMA_FILE, map_location="cpu", weights_only=True)["shadow_params"]
    except Exception as exc:  # as in load()
        raise InputError(
            f"{found[-1] / EMA_FILE}: cannot be loaded for the warm start ({type(exc).__name__}: {exc})"
        ) from None


def save(accelerator: Accelerator, folder: Path, progress: Progress, keep: int) -> Path:
    """Write checkpoint step-<progress.step> (every process takes part), then drop the ones no longer needed."""
    name = f"step-{progress.step:08d}"
    tmp, final = folder / f".{name}.tmp", folder / name
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE).write_text(json.dumps(asdict(progress)))
        _sync(tmp)
        if final.exists():  # a checkpoint of another run at the same step
            _remove(final)
        os.replace(tmp, final)
        _prune(folder, progress, keep)
    accelerator.wait_for_everyone()
    return final


def _sync(folder: Path) -> None:
    """Flush the files to disk before the rename makes them the checkpoint (a power cut must not leave empty files)."""
    for path in [*folder.rglob("*"), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove(checkpoint: Path) -> None:
    """Rename, then delete: a kill midway leaves a hidden leftover, never a half-deleted checkpoint."""
    trash = checkpoint.with_name(f".{checkpoint.name}.deleted")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(checkpoint, trash)
    shutil.rmtree(trash)


def _prune(folder: Path, progress: Progress, keep: int) -> None:
    """Delete other runs' checkpoints (and this run's past its step, left by a longer run), all but the newest `keep`
    of this run, and leftovers of killed saves."""
    ours = []
    for checkpoint in saved(folder):
        try:
            other = read_progress(checkpoint)
            same = other.fingerprint == progress.fingerprint and other.step <= progress.step
        except InputError:
            same = False
        if same:
            ours.append(checkpoint)
        else:
            _remove(checkpoint)
    for checkpoint in ours[:-keep]:
        _remove(checkpoint)
    for leftover in folder.glob(".step-*"):  # .tmp of a killed save, .deleted of a killed removal
        shutil.rmtree(leftover)
