"""The trainer in real processes: killed with SIGKILL under `dvc repro` and resumed, and run by 2 processes (gloo)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dextra.pipeline.paths import Paths
from dextra.pipeline.stages import clip as clip_stage
from dextra.train import checkpoint
from tests.helpers import REPO
from tests.helpers.dvc import git_repository
from tests.helpers.train import losses, write_curated, write_seed
from tests.helpers.train import small_training_params as make_params

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}  # same threads everywhere: same floats


def project(root: Path, params) -> Path:
    """A DVC project holding the repository's own pretrain stage, its inputs and `params`."""
    paths = Paths(root)
    write_curated(paths)
    write_seed(paths, "test", 4)  # clip reports its retrieval recall on seed test
    clip_stage.run(params, paths)
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for dep in stages["pretrain"]["deps"]:  # the code the stage runs; the data are written above
        source = REPO / dep
        if dep.startswith(("data/", "models/")) or (root / dep).exists():
            continue
        if source.is_dir():
            shutil.copytree(source, root / dep, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (root / dep).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / dep)
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"pretrain": stages["pretrain"]}}, sort_keys=False))
    (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    git_repository(root, dvc_init=True)
    return root


def dvc_repro(root: Path) -> str:
    result = subprocess.run(["dvc", "repro"], cwd=root, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def summary(output: str) -> dict:
    line = next(line for line in output.splitlines() if line.startswith("dextra pretrain: done"))
    return json.loads(line[line.index("{") :])


@pytest.mark.slow
def test_killed_dvc_repro_resumes_with_the_same_losses(tmp_path):
    params = make_params(
        device="cpu",
        train=dict(log_every=1, checkpoint_every=5, grid_samples=0, random_flip=True, condition_dropout=0.3),
        pretrain=dict(steps=30),
    )
    reference = Paths(tmp_path / "reference")
    write_curated(reference)
    (reference.root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    subprocess.run(
        ["dextra", "pretrain", "--root", str(reference.root), "--params", str(reference.root / "params.yaml")],
        env=ENV,
        check=True,
        capture_output=True,
        timeout=600,
    )

    root = project(tmp_path / "project", params)
    folder = Paths(root).checkpoints("pretrain")
    running = subprocess.Popen(
        ["dvc", "repro"],
        cwd=root,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not (folder / "step-00000010").exists():
        assert running.poll() is None and time.monotonic() < deadline, "the run ended before its second checkpoint"
        time.sleep(0.02)
    os.killpg(running.pid, signal.SIGKILL)  # dvc and the trainer under it, as a crash or the OOM killer would
    running.wait()
    killed_at = checkpoint.read_progress(checkpoint.saved(folder)[-1]).step
    assert 10 <= killed_at < 30 and not (root / "models" / "pretrain").exists()

    resumed = summary(dvc_repro(root))  # DVC empties models/ and dvclive/ but keeps the persist out
    assert resumed["resumed_from_step"] == killed_at and resumed["steps"] == 30
    assert losses(Paths(root)) == losses(reference) and len(losses(reference)) == 30
    ours, theirs = (
        load_file(p.model("pretrain") / "unet" / "diffusion_pytorch_model.safetensors")
        for p in (Paths(root), reference)
    )
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)

    assert "Running stage" not in dvc_repro(root)  # after a full run, nothing to do
    status = subprocess.run(["dvc", "status"], cwd=root, env=ENV, capture_output=True, text=True, check=True).stdout
    assert "up to date" in status, status


@pytest.mark.slow
def test_dvc_repro_starts_the_processes_that_train_num_processes_asks_for(tmp_path):
    """dvc.yaml's cmd stays `dextra pretrain`: the stage starts `accelerate launch` itself (gloo on CPU)."""
    steps, batch = 4, 4
    params = make_params(
        device="cpu",
        train=dict(batch_size=batch, num_processes=2, checkpoint_every=steps, grid_samples=0),
        pretrain=dict(steps=steps),
    )
    root = project(tmp_path / "project", params)
    done = summary(dvc_repro(root))
    assert done["processes"] == 2 and done["steps"] == steps
    last = checkpoint.saved(Paths(root).checkpoints("pretrain"))[-1]
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in last.iterdir()}
    assert checkpoint.read_progress(last).position == steps * 2 * batch  # each step drew a batch per process
    assert "Running stage" not in dvc_repro(root)


WORKER = """
import json, os, sys
from pathlib import Path
from dextra.train import data
seen = []
batch = data.TrainingSet.batch
def record(self, index, *args):
    seen.append(index.tolist())
    return batch(self, index, *args)
data.TrainingSet.batch = record
from dextra.pipeline.cli import main
code = main(sys.argv[1:])
Path(sys.argv[sys.argv.index("--root") + 1], f"seen-{os.environ['RANK']}.json").write_text(json.dumps(seen))
sys.exit(code)
"""


@pytest.mark.slow
def test_two_processes_split_every_batch_and_write_one_checkpoint(tmp_path):
    steps, batch, images = 6, 4, 32
    params = make_params(
        device="cpu",
        train=dict(batch_size=batch, log_every=1, checkpoint_every=3, grid_samples=2),
        pretrain=dict(steps=steps),
    )
    paths = Paths(tmp_path)
    write_curated(paths, n=images)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    (tmp_path / "worker.py").write_text(WORKER)
    # `accelerate launch --cpu --num_processes 2` starts one process unless given an MPI hostfile (accelerate 1.15);
    # --multi_gpu launches through torchrun, and the trainer's Accelerator(cpu=True) then picks gloo.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            str(tmp_path / "worker.py"),
            "pretrain",
            "--root",
            str(tmp_path),
            "--params",
            str(tmp_path / "params.yaml"),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert summary(result.stdout)["processes"] == 2

    assert len(losses(paths)) == steps  # the same number of optimizer steps as one process takes
    seen = [json.loads((tmp_path / f"seen-{rank}.json").read_text()) for rank in (0, 1)]
    assert all(len(s) == steps and all(len(b) == batch for b in s) for s in seen)
    epoch = [i for step in range(images // (2 * batch)) for rank in (0, 1) for i in seen[rank][step]]
    assert sorted(epoch) == list(range(images))  # the first epoch: each image once, over both processes
    assert all(not set(a) & set(b) for a, b in zip(*seen))

    folder = paths.checkpoints("pretrain")
    assert [p.name for p in checkpoint.saved(folder)] == ["step-00000003", "step-00000006"]
    files = {p.name for p in (folder / "step-00000006").iterdir()}
    assert {
        "model.safetensors",
        "random_states_0.pkl",
        "random_states_1.pkl",
    } <= files  # one checkpoint, each process's RNG
    assert checkpoint.read_progress(folder / "step-00000006").position == steps * 2 * batch
    assert (paths.model("pretrain") / "unet" / "config.json").exists()
