"""Running DVC on a copy of the project."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import yaml

# The embedded demo small enough for whole `dvc repro` runs in tests: every stage runs for real, in about a minute.
SMALL_DEMO = {
    "demo": {"n_seed": 120, "n_web": 200, "n_corpus": 200},
    "fetch": {"processes": 1, "threads": 8, "shard_size": 50},
    "clip": {"train_epochs": 2, "batch_size": 32, "corpus_epochs": 1},
    # Two epochs of CLIP cannot tell digits apart, so the detectors would keep nothing: judge by distance here.
    "curate": {"cluster_detector": False, "class_detector": False, "distance_detector": "on"},
    "train": {"monitor_samples": 8, "deterministic": True, "checkpoint_every": 5},
    "pretrain": {"steps": 20, "warmup_steps": 2},
    "finetune": {"steps": 10, "warmup_steps": 2},
    "prior": {"steps": 50},
    "evaluate": {"num_samples": 16, "sampling_steps": 3, "batch_size": 16},
}


def dvc(root, *args):
    result = subprocess.run(["dvc", *args], cwd=root, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def stages_run(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


def in_dependency_order(root, ran: list[str]) -> bool:
    """Whether every stage in `ran` came after the stages whose outputs it reads (DVC may order independent
    stages either way, and does so differently as the graph grows)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]

    def paths(entries) -> list[str]:
        return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]

    writer = {out: name for name, stage in stages.items() for out in paths(stage.get("outs"))}
    for position, name in enumerate(ran):
        for dep in paths(stages[name].get("deps")):
            upstream = {w for out, w in writer.items() if dep == out or dep.startswith(out + "/")}
            if any(u in ran and ran.index(u) > position for u in upstream):
                return False
    return True


def project_copy(root: Path, params: dict) -> Path:
    """The repository's tracked files under `root` with `params` as params.yaml and no dvc.lock, committed to a new
    git repository (dvclive needs a commit to stand on)."""
    from tests.helpers import REPO

    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    (root / "dvc.lock").unlink(missing_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git_repository(root)
    return root


def git_repository(root: Path, dvc_init: bool = False) -> None:
    """Everything under `root` committed to a new git repository (dvclive needs a commit to stand on), after
    `dvc init` with `dvc_init`."""
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    if dvc_init:
        subprocess.run(["dvc", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], cwd=root, check=True)


def start_repro(root: Path, *targets: str) -> subprocess.Popen:
    """`dvc repro` in its own session (so one killpg ends it and its stage), printing each line as it comes."""
    return subprocess.Popen(
        ["dvc", "repro", *targets],
        cwd=root,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def timed_repro(root: Path, *targets: str) -> tuple[str, dict[str, float]]:
    """`dvc repro`'s output, and how long each stage it ran took (from one "Running stage" line to the next)."""
    running, started, lines = start_repro(root, *targets), {}, []
    for line in running.stdout:
        lines.append(line)
        if line.startswith("Running stage"):
            started[line.split("'")[1]] = time.monotonic()
    assert running.wait() == 0, "".join(lines)[-3000:]
    ends = sorted(started.values())[1:] + [time.monotonic()]
    return "".join(lines), {
        name: end - start for (name, start), end in zip(sorted(started.items(), key=lambda i: i[1]), ends)
    }
