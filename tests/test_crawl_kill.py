"""kill -9 of `dextra fetch` at random moments, then running it again: the run completes, committed shards are
kept and never fetched again, no worker outlives its run, and the final (url_id, sha256) set is the one an
uninterrupted run gets."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from PIL import Image

from dextra.crawl.status import read_status
from dextra.pipeline.shards import IMAGE_SCHEMA, URL_SCHEMA, read_table, shard_files
from dextra.pipeline.stages import urls
from tests.helpers.web import Web, encoded, loopback_only_env, project, static, write_csv

N_IMAGES, N_MISSING, KILLS = 800, 40, 5


def _slow(reply, delay_s: float = 0.03):
    """Each image takes a little while, so that kills land in the middle of shards."""

    def slowed(h):
        time.sleep(delay_s)
        reply(h)

    return slowed


def _setup(root: Path, web: Web):
    rows = [f"{web.base}/img/{i}.jpg,image {i},q{i % 7},c{i % 7}" for i in range(N_IMAGES)]
    rows += [f"{web.base}/missing/{i}.jpg,gone {i},q,c" for i in range(N_MISSING)]
    random.Random(1).shuffle(rows)
    write_csv(root / "lists" / "web.csv", "url,text,query,class", rows)
    params, paths = project(
        root, [{"name": "web", "path": "lists/web.csv"}], web=web, processes=2, threads=8, shard_size=60
    )
    urls.run(params, paths)
    return paths


def _fetch(root: Path, env: dict) -> subprocess.Popen:
    args = [
        sys.executable,
        "-m",
        "dextra.pipeline.cli",
        "fetch",
        "--root",
        str(root),
        "--params",
        str(root / "params.yaml"),
    ]
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _journal(paths) -> list[Path]:
    return list((paths.crawl_journal).glob("*.parquet"))


def _session(sid: int) -> list[psutil.Process]:
    alive = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except (psutil.Error, ProcessLookupError):
            pass
    return alive


def _outcome(paths) -> tuple[dict, set]:
    status = {r["url_id"]: r["status"] for r in read_status(paths).to_pylist()}
    images = [
        (r["id"], r["sha256"])
        for p in shard_files(paths.crawl_shards)
        for r in read_table(p, IMAGE_SCHEMA, ["id", "sha256"]).to_pylist()
    ]
    assert len(images) == len({i for i, _ in images}), "an image stored twice"
    return status, set(images)


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume(tmp_path):
    web = Web()
    for i in range(N_IMAGES):
        web.routes[f"/img/{i}.jpg"] = _slow(
            static(encoded(Image.new("RGB", (40 + i % 50, 30 + i % 31), (i % 256, 7 * i % 256, 99)), "JPEG"))
        )
    env = loopback_only_env(tmp_path / "guard")
    try:
        reference = _setup(tmp_path / "reference", web)
        assert _fetch(reference.root, env).wait(timeout=600) == 0
        expected_status, expected_images = _outcome(reference)
        assert len(expected_status) == N_IMAGES + N_MISSING and len(expected_images) == N_IMAGES

        paths = _setup(tmp_path / "killed", web)
        ids = {
            r["url"].removeprefix(web.base): r["url_id"]
            for r in read_table(paths.urls / "web.parquet", URL_SCHEMA).to_pylist()
        }
        rng = random.Random(8)
        committed: set[str] = set()  # url_ids with a committed row before the latest kill
        kept_shards: dict[str, bytes] = {}
        kills = progressed = 0
        killed: list[int] = []  # session ids of the killed runs
        while kills < KILLS:
            web.hits.clear()
            before, old_journal = len(read_status(paths)), set(_journal(paths))
            process = _fetch(paths.root, env)
            # at any moment of start-up (lock, consolidation, imports, spawning workers), at the latest at its first
            # commit
            if kills % 2:
                deadline = time.monotonic() + rng.uniform(0.2, 8.0)
                while time.monotonic() < deadline and process.poll() is None and not set(_journal(paths)) - old_journal:
                    time.sleep(0.05)
            else:  # while shards are being fetched and committed: soon after this run's first commit
                while process.poll() is None and not set(_journal(paths)) - old_journal:
                    time.sleep(0.05)
                time.sleep(rng.uniform(0.0, 1.0))
            assert process.poll() is None, "the run finished before its kill: make the corpus larger"
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            kills += 1
            killed.append(process.pid)
            assert not [path for path in web.hits if ids.get(path) in committed], "a committed URL was fetched again"
            status = read_status(paths)
            progressed += len(status) > before
            committed |= set(status["url_id"].to_pylist())
            for name in set(status["shard"].drop_null().to_pylist()) - set(kept_shards):
                kept_shards[name] = (paths.crawl_shards / name).read_bytes()
        assert kills >= 5 and progressed >= 2, (kills, progressed)

        web.hits.clear()
        assert _fetch(paths.root, env).wait(timeout=600) == 0
        assert not [path for path in web.hits if ids.get(path) in committed]
        status, images = _outcome(paths)
        assert status == expected_status and images == expected_images
        print(
            f"kill test: {kills} kills, {progressed} of them after commits; "
            f"{len(kept_shards)} shards committed before a kill kept"
        )
        for name, data in kept_shards.items():  # shards committed before a kill are kept as they were
            assert (paths.crawl_shards / name).read_bytes() == data
        assert not (paths.crawl_work).exists() and not (paths.crawl_journal).exists()
        deadline = time.monotonic() + 60  # workers still importing at the kill need that long to get to their watch
        while any(map(_session, killed)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not [p for sid in killed for p in _session(sid)], "a worker outlived its killed run"
    finally:
        web.close()
