"""`dvc repro` killed with SIGKILL at random moments spread over fetch, embed, curate, pretrain and finetune, and run
again after each kill: the final outputs are those of an uninterrupted run, and no stage is left believing a
half-written output is done."""

from __future__ import annotations

import os
import random
import shutil
import signal
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dextra.pipeline.shards import shard_files
from tests.helpers.dvc import dvc, stages_run, start_repro

# Where each kill aims: the stage it waits for (or any stage after it), then a random moment within that stage's
# length in the uninterrupted run. Fetch and pretrain keep partial work (shards, checkpoints), so they are hit twice.
AIMS = ("fetch", "fetch", "embed", "curate", "pretrain", "pretrain", "finetune", "finetune")
ORDER = ("seed", "urls", "fetch", "clip", "embed", "curate", "pretrain", "finetune")
# Written whole by their stage: after the kills they must equal the uninterrupted run's, byte for byte (row
# for row where a file names the project's folder).
WHOLE = ("data/seed", "data/urls", "data/curated", "models/clip", "models/pretrain", "models/finetune")


def _kill_at_random_moment(
    root: Path, aim: str, seconds: dict[str, float], rng: random.Random, latest: float
) -> str | None:
    """Start `dvc repro finetune`, kill its whole session at a random moment of stage `aim` (or of the first later
    stage it runs), within the first `latest` share of its length in the uninterrupted run; the stage that was
    running at the kill, or None if the run finished first."""
    running, current, timer = start_repro(root, "finetune"), [None], None

    def kill() -> None:
        os.killpg(running.pid, signal.SIGKILL)

    for line in running.stdout:
        if not line.startswith("Running stage"):
            continue
        current[0] = line.split("'")[1]
        if timer is None and ORDER.index(current[0]) >= ORDER.index(aim):
            timer = threading.Timer(rng.uniform(0.05, latest) * seconds[current[0]], kill)
            timer.start()
    code = running.wait()
    if timer is not None:
        timer.cancel()
    return current[0] if code == -signal.SIGKILL else None


def _project_free(value: object, root: Path) -> object:
    """`value` with the project's folder taken out: the demo's file:// URLs, and the errors of the dead ones, name
    where the project is, and the two runs are in two folders."""
    if isinstance(value, str):
        return value.replace(root.as_uri(), "<project>").replace(str(root), "<project>")
    if isinstance(value, list):
        return tuple(_project_free(v, root) for v in value)
    return value


def _table(root: Path, path: Path, columns: list[str] | None = None) -> list[tuple]:
    return sorted(
        tuple(_project_free(v, root) for v in row.values()) for row in pq.read_table(path, columns=columns).to_pylist()
    )


def _rows(root: Path, folder: Path, columns: list[str]) -> set:
    """Every row of the Parquet files in `folder` (their layout into files may differ between runs)."""
    return {row for path in shard_files(folder) for row in _table(root, path, columns)}


def _files(root: Path, folder: str) -> dict[str, object]:
    """Each file's bytes; a Parquet file's rows instead (see _project_free)."""
    return {
        str(path.relative_to(root)): _table(root, path) if path.suffix == ".parquet" else path.read_bytes()
        for path in sorted((root / folder).rglob("*"))
        if path.is_file() and not path.name.startswith(".")
    }


@pytest.mark.slow
def test_repro_killed_anywhere_ends_where_an_uninterrupted_run_does(tmp_path, small_demo):
    root = tmp_path / "killed"
    shutil.copytree(small_demo.pristine, root, symlinks=True)
    rng = random.Random(16)
    # Within the first 70% of a stage's length in the uninterrupted run (a run on a less loaded machine may finish
    # sooner than that run did); a stage hit before resumes from what it kept, so the second kill aims within 30%.
    hit = [
        _kill_at_random_moment(root, aim, small_demo.seconds, rng, 0.3 if aim in AIMS[:k] else 0.7)
        for k, aim in enumerate(AIMS)
    ]
    assert None not in hit, f"a run finished before its kill: {hit}"
    assert {"fetch", "embed", "curate", "pretrain", "finetune"} <= set(hit), hit

    finished = stages_run(dvc(root, "repro", "finetune"))
    assert finished and set(finished) <= set(ORDER), finished
    assert stages_run(dvc(root, "repro", "finetune")) == []  # nothing half-written is taken for done
    reference = small_demo.finished
    for folder in WHOLE:
        assert _files(root, folder) == _files(reference, folder), folder
    # The crawl and the embeddings are kept between runs in shards committed as they finish, so the kills may file
    # them otherwise: their rows must be the same.
    for folder, columns in [
        ("data/crawl/shards", ["id", "sha256", "image"]),
        ("data/crawl", ["url_id", "status", "error"]),
        *(
            (f"data/embeddings/{kind}", ["id", "embedding"])
            for kind in ("seed_images", "seed_captions", "crawl_images")
        ),
    ]:
        ours, theirs = (_rows(r, r / folder, columns) for r in (root, reference))
        assert ours == theirs and ours, folder
