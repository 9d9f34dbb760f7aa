"""curate's core at scale: synthetic unit vectors (d = 512, 10k seed images in 100 classes, 2k test images) with
100k to 10M crawled images (in-domain, wrong-class, off-topic, near copies), no images, so copies are found by
CLIP similarity alone. The crawled vectors are float16 in a memory-mapped file (in TMPDIR), as the curate stage
maps them. Each size runs in its own process; its peak RSS is counted from when the synthetic inputs are built
(they are included; the generator's own temporaries are not).

    python bench/curate_scale.py [--sizes 100000 1000000 10000000]

Targets (issue 4): 1M in < 10 min on 2 cores with peak RSS < 4 GiB; time grows ≤ 11x from 100k to 1M. Issue 17:
10M with peak memory well under 8 GiB. Two peaks: VmHWM counts the pages of the mapped vector file the process
touched (the kernel can drop them at any time: they are the file's), the anonymous peak (RssAnon, sampled every
50 ms) is the memory curate itself holds. Records wall and CPU seconds of the core and the machine's load average
around each run (other processes on a shared machine stretch wall time, less so CPU time), and the commit measured.
Writes bench/results/curate_scale.json; with --add, runs of other sizes already there are kept (10M takes most of an
hour, so it is measured on its own).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DIM, SEED_IMAGES, TEST_IMAGES, CLASSES = 512, 10_000, 2_000, 100


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def synthetic(n_crawl: int, rng: np.random.Generator, folder: Path):
    from dextra.filter.curate import Crawl, SeedSet

    centres = unit(rng.normal(size=(CLASSES, DIM)))
    seed_classes = np.arange(SEED_IMAGES) % CLASSES
    seed_vectors = unit(centres[seed_classes] + 0.6 * rng.normal(size=(SEED_IMAGES, DIM)) / np.sqrt(DIM) * 8)
    seed = SeedSet(
        train_ids=[f"s{i}" for i in range(SEED_IMAGES)],
        train_vectors=seed_vectors,
        train_classes=[str(c) for c in seed_classes],
        caption_features=unit(rng.normal(size=(SEED_IMAGES, DIM))),
        first_captions=[f"class {c}" for c in seed_classes],
        test_ids=[f"t{i}" for i in range(TEST_IMAGES)],
        test_vectors=unit(
            centres[np.arange(TEST_IMAGES) % CLASSES] + 0.6 * rng.normal(size=(TEST_IMAGES, DIM)) / np.sqrt(DIM) * 8
        ),
        test_images=None,
    )
    vectors = np.lib.format.open_memmap(folder / "crawl.npy", "w+", np.float16, (n_crawl, DIM))
    query_class = rng.integers(0, CLASSES, n_crawl)
    kind = rng.choice(4, n_crawl, p=[0.6, 0.15, 0.2, 0.05])  # in-domain, wrong class, off-topic, near copy
    for start in range(0, n_crawl, 100_000):
        end = min(n_crawl, start + 100_000)
        k, q = kind[start:end], query_class[start:end]
        shown = np.where(k == 1, (q + 1 + rng.integers(0, CLASSES - 1, end - start)) % CLASSES, q)
        chunk = centres[shown] + 0.6 * rng.normal(size=(end - start, DIM)).astype(np.float32) / np.sqrt(DIM) * 8
        chunk[k == 2] = rng.normal(size=((k == 2).sum(), DIM))
        vectors[start:end] = unit(chunk)
    copies = np.flatnonzero(kind == 3)
    vectors[copies] = unit(
        vectors[np.maximum(copies - 1, 0)].astype(np.float32)
        + 0.02 * rng.normal(size=(len(copies), DIM)) / np.sqrt(DIM)
    )
    vectors.flush()
    names, queries = [str(c) for c in range(CLASSES)], [f"class {c}" for c in range(CLASSES)]
    crawl = Crawl(
        ids=[f"c{i:08d}" for i in range(n_crawl)],
        vectors=np.load(folder / "crawl.npy", mmap_mode="r"),
        queries=[queries[c] for c in query_class],  # shared strings, as pyarrow's to_pylist gives repeated values
        classes=[names[c] for c in query_class],
        digests=[f"{i}" for i in range(n_crawl)],
        hashes=None,
        read_images=None,
    )
    return seed, crawl


def _status_kib(field: str) -> int:
    """A field of /proc/self/status: VmHWM (the peak resident set since the last reset through
    /proc/self/clear_refs) or RssAnon (the anonymous part of the resident set now)."""
    return int(
        next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field)).split()[1]
    )


class AnonPeak(threading.Thread):
    """The largest RssAnon seen, sampled every 50 ms (Linux keeps a peak only for the whole RSS)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.done = _status_kib("RssAnon"), threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            self.peak = max(self.peak, _status_kib("RssAnon"))


def measure(n_crawl: int) -> dict:
    """Runs in a child process: build the data, time the core, report peak RSS."""
    import faiss
    import torch

    from dextra.filter.curate import curate
    from dextra.pipeline.params import CurateParams

    with tempfile.TemporaryDirectory(prefix="dextra-curate-scale-") as folder:
        seed, crawl = synthetic(n_crawl, np.random.default_rng(0), Path(folder))
        generation_peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        Path("/proc/self/clear_refs").write_text("5")  # Linux: restart the peak-RSS count (inputs included)
        load_before = os.getloadavg()[0]
        anon = AnonPeak()
        anon.start()
        started, cpu_started = time.perf_counter(), time.process_time()
        decisions, extrapolation, _ = curate(seed, crawl, CurateParams(), 0, torch.device("cpu"), scratch=Path(folder))
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        anon.done.set()
        anon.join()
        peak_rss_gib = _status_kib("VmHWM") / 2**20
    outcomes = dict(zip(*np.unique(decisions.outcome.astype(str), return_counts=True)))
    return {
        "crawled": n_crawl,
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),
        "threads": {"faiss": faiss.omp_get_max_threads(), "torch": torch.get_num_threads()},
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "peak_rss_gib": round(peak_rss_gib, 2),
        "peak_anon_rss_gib": round(anon.peak / 2**20, 2),
        "data_generation_peak_rss_gib": round(generation_peak_gib, 2),
        "outcomes": {k: int(v) for k, v in outcomes.items()},
        "kept": int(len(extrapolation.rows)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--small", action="store_true", help="CI's size: 20,000 crawled images; writes under bench/results/small/"
    )
    parser.add_argument("--add", action="store_true", help="keep the recorded runs of sizes not measured now")
    args = parser.parse_args()
    from dextra.pipeline.atomic import write_json
    from dextra.pipeline.paths import Paths

    path = Paths(ROOT).bench_result("curate_scale", args.small)
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True)
    if args.child:
        print(json.dumps(measure(args.child)))
        return
    runs = []
    for size in [20_000] if args.small else args.sizes:
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(size)], capture_output=True, text=True, check=True
        )
        runs.append({**json.loads(out.stdout.strip().splitlines()[-1]), "commit": commit.stdout.strip()})
        print(
            f"{size:>9,} crawled: {runs[-1]['seconds']:7.1f} s ({runs[-1]['cpu_seconds']:.0f} CPU s, "
            f"load {runs[-1]['load_average_1min']}), peak RSS {runs[-1]['peak_rss_gib']:.2f} GiB "
            f"(anonymous {runs[-1]['peak_anon_rss_gib']:.2f} GiB), "
            f"kept {runs[-1]['kept']:,}"
        )
    previous = json.loads(path.read_text()) if args.add and path.exists() else {"runs": []}
    measured = {run["crawled"] for run in runs}
    kept = [run for run in previous["runs"] if run["crawled"] not in measured]
    result = {
        "dim": DIM,
        "seed_images": SEED_IMAGES,
        "test_images": TEST_IMAGES,
        "cores": os.cpu_count(),
        "runs": sorted(kept + runs, key=lambda run: run["crawled"]),
    }
    if len(runs) >= 2:  # growth between runs of one invocation: same code, same machine state
        result["time_growth"] = round(runs[-1]["seconds"] / runs[0]["seconds"], 2)
        result["size_growth"] = runs[-1]["crawled"] / runs[0]["crawled"]
        print(f"time grows {result['time_growth']}x for {result['size_growth']:.0f}x the crawl")
    elif "time_growth" in previous:
        result.update(time_growth=previous["time_growth"], size_growth=previous["size_growth"])
    write_json(path, result)


if __name__ == "__main__":
    main()
