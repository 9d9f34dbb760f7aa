"""Embedding whole shards in several workers: processes on this machine (one per GPU in turn on CUDA) or Ray actors
on a cluster. Each worker loads the CLIP model once and embeds the shards it is handed; results arrive as each shard
is written, so the caller can record every finished shard at once and a killed run keeps its work.

Written here because the pieces are small and the libraries lack the one policy that matters: a worker that dies
(killed, out of memory) loses only the shards it had not finished, which are handed to fresh workers, a bounded number
of times. concurrent.futures and Ray's ActorPool do the process and actor management.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import torch

from dextra.filter.clip import ClipBundle, load_clip
from dextra.filter.embed import embed_shard
from dextra.pipeline.errors import ParamsError


@dataclass(frozen=True)
class ShardJob:
    kind: str
    source: Path
    target: Path


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker needs to load the model and embed like the others."""

    clip_folder: Path
    device: str  # "cpu" or "cuda"
    batch_size: int
    num_workers: int  # DataLoader workers inside each embedding worker
    threads: int  # torch CPU threads per worker, so that N workers share the cores instead of fighting over them


def _load(spec: WorkerSpec, rank: int) -> ClipBundle:
    torch.set_num_threads(spec.threads)
    device = f"cuda:{rank % torch.cuda.device_count()}" if spec.device == "cuda" else "cpu"
    return load_clip(spec.clip_folder, device)


_worker_bundle: ClipBundle | None = None
_worker_spec: WorkerSpec | None = None


def _start_process(spec: WorkerSpec, ranks) -> None:
    global _worker_bundle, _worker_spec
    _worker_spec, _worker_bundle = spec, _load(spec, ranks.get())


def _embed_in_process(job: ShardJob) -> int:
    return embed_shard(
        _worker_bundle, job.kind, job.source, job.target, _worker_spec.batch_size, _worker_spec.num_workers
    )


def _processes(spec: WorkerSpec, jobs: list[ShardJob], workers: int, restarts: int) -> Iterator[tuple[ShardJob, int]]:
    context = multiprocessing.get_context("spawn")  # fork after torch has started threads can hang
    pending = list(jobs)
    for attempt in range(restarts + 1):
        ranks = context.Queue()
        for rank in range(workers):
            ranks.put(rank)
        broken = False
        with ProcessPoolExecutor(workers, context, initializer=_start_process, initargs=(spec, ranks)) as pool:
            futures = {pool.submit(_embed_in_process, job): job for job in pending}
            remaining = set(futures)
            while remaining:
                done, remaining = wait(remaining, return_when=FIRST_COMPLETED)
                for future in done:
                    error = future.exception()
                    if isinstance(error, BrokenProcessPool):
                        broken = True
                    elif error is not None:
                        pool.shutdown(cancel_futures=True)
                        raise error
                    else:
                        pending.remove(futures[future])
                        yield futures[future], future.result()
        if not broken:
            return
        if attempt < restarts:
            print(
                f"dextra embed: a worker died; {len(pending)} shard(s) it had not finished go to new workers",
                flush=True,
            )
    raise RuntimeError(f"embed: workers died {restarts + 1} times; {len(pending)} shard(s) not embedded")


class _RayWorker:
    def __init__(self, spec: WorkerSpec, rank: int):
        self.spec, self.bundle = spec, _load(spec, rank)

    def embed(self, job: ShardJob) -> tuple[ShardJob, int]:
        spec = self.spec
        return job, embed_shard(self.bundle, job.kind, job.source, job.target, spec.batch_size, spec.num_workers)


def _ray(spec: WorkerSpec, jobs: list[ShardJob], workers: int) -> Iterator[tuple[ShardJob, int]]:
    """Actors on the cluster `ray.init` finds (RAY_ADDRESS), or on a local one it starts; the project folder must be
    on a file system every node sees. Ray re-runs a task whose actor died (max_task_retries)."""
    if importlib.util.find_spec("ray") is None:
        raise ParamsError("embed.distributor: ray is not installed (pip install -e '.[ray]')")
    import ray
    from ray.util import ActorPool

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=True)
    options = {"num_gpus": 1} if spec.device == "cuda" else {"num_cpus": spec.threads}
    actor = ray.remote(max_restarts=2, max_task_retries=2, **options)(_RayWorker)
    # Ray gives each GPU actor its own CUDA_VISIBLE_DEVICES, so every actor's rank-0 device is its own GPU
    actors = [actor.remote(spec, 0 if spec.device == "cuda" else rank) for rank in range(workers)]
    try:
        yield from ActorPool(actors).map_unordered(lambda worker, job: worker.embed.remote(job), jobs)
    finally:
        for worker in actors:
            ray.kill(worker)


def embed_shards(
    jobs: Iterable[ShardJob],
    spec: WorkerSpec,
    workers: int = 1,
    distributor: str = "multiprocessing",
    restarts: int = 2,
) -> Iterator[tuple[ShardJob, int]]:
    """(job, vectors written) for every job, in the order they finish. One worker and multiprocessing embed in this
    process: no start-up cost, the same results."""
    jobs = list(jobs)
    if not jobs:
        return
    if distributor == "ray":
        yield from _ray(spec, jobs, workers)
    elif workers == 1:
        bundle = _load(spec, 0)
        for job in jobs:
            yield job, embed_shard(bundle, job.kind, job.source, job.target, spec.batch_size, spec.num_workers)
    elif distributor == "multiprocessing":
        yield from _processes(spec, jobs, min(workers, len(jobs)), restarts)
    else:
        raise ParamsError(f"embed.distributor: {distributor!r} is not one of multiprocessing, ray")
