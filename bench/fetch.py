"""Fetch throughput: `dextra fetch` (the guard in every worker, the per-host limits and robots.txt, the per-shard
commits, the status record) against a direct `img2dataset.download` call on the same URL list, spread over
`--hosts` loopback servers (127.0.0.1, 127.0.0.2, ...: separate hosts to the crawler), with the same processes,
threads, shard size and image policy, in one process, in turn, `--reps` times each; a third run is dextra with
fetch.polite.robots_txt off. Prints the median ratios of images/s against plain img2dataset (target >= 0.95) and
the highest request rate any one host saw in a second. robots.txt costs one request per host more than plain
img2dataset makes (hosts / images of the requests, 4% at 3,000 images on 128 hosts), so the run without it tells
what the rest of the machinery costs. Also checks that a resumed URL-list download fetches no more than the missing
bytes plus one chunk. Writes bench/results/fetch.json.

    python bench/fetch.py [--images 3000] [--hosts 128] [--reps 5]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

from dextra.crawl.download import CHUNK, download_file  # noqa: E402
from dextra.crawl.worker import img2dataset_main  # noqa: E402
from dextra.pipeline.atomic import write_json  # noqa: E402
from dextra.pipeline.errors import InputError  # noqa: E402
from dextra.pipeline.params import parse_params  # noqa: E402
from dextra.pipeline.paths import Paths  # noqa: E402
from dextra.pipeline.stages import fetch, urls  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROCESSES, THREADS = 2, 16


class _Handler(BaseHTTPRequestHandler):
    """Static files; a `Range: bytes=N-` gets a 206 with the rest; `drop_after` cuts the next response short."""

    def do_GET(self) -> None:  # noqa: N802
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        self.send_header("ETag", '"1"')
        self.send_header("Content-Length", str(len(body) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        out = body[start:]
        drop, self.server.drop_after = self.server.drop_after, None
        out = out[:drop] if drop is not None else out
        self.wfile.write(out)
        self.server.served.append(len(out))
        self.server.starts.append(time.monotonic())

    def log_message(self, *args) -> None:
        pass


class _Server(ThreadingHTTPServer):
    request_queue_size = 256
    daemon_threads = True


def _images(n: int) -> dict[str, bytes]:
    """Distinct JPEGs of web-image size (320x240), smooth gradients plus noise."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:240, 0:320]
    files = {}
    for i in range(n):
        base = np.stack([(x + i) % 256, (y * 2 + 3 * i) % 256, (x + y + 7 * i) % 256], -1)
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, "JPEG", quality=85)
        files[f"/img/{i}.jpg"] = out.getvalue()
    return files


def _baseline(list_path: Path, work: Path, shard_size: int) -> int:
    """Plain img2dataset, as the fetch stage calls it minus the guard and the bookkeeping; returns images stored."""
    fetch_params = parse_params(yaml.safe_load((ROOT / "params.yaml").read_text())).fetch
    img2dataset_main.download(
        url_list=str(list_path),
        output_folder=str(work / "out"),
        input_format="parquet",
        url_col="url",
        caption_col="text",
        output_format="parquet",
        image_size=fetch_params.image_size,
        resize_mode=fetch_params.resize_mode,
        encode_format=fetch_params.encode_format,
        encode_quality=fetch_params.encode_quality,
        processes_count=PROCESSES,
        thread_count=THREADS,
        timeout=fetch_params.timeout_s,
        retries=0,
        number_sample_per_shard=shard_size,
        extract_exif=False,
        compute_hash=None,
        distributor="multiprocessing",
        enable_wandb=False,
    )
    return sum(
        pq.read_table(p, columns=["status"]).column("status").to_pylist().count("success")
        for p in (work / "out").glob("*.parquet")
    )


def _dextra(list_path: Path, root: Path, shard_size: int, robots_txt: bool) -> tuple[int, float]:
    """`dextra urls` (untimed), then `dextra fetch` (timed) on a fresh repository root; returns (ok, seconds)."""
    (root / "manifests").mkdir(parents=True)
    manifest = {
        "name": "bench",
        "seed": {"importer": "demo"},
        "sources": [{"name": "web", "path": str(list_path), "format": "parquet"}],
    }
    (root / "manifests" / "bench.yaml").write_text(yaml.safe_dump(manifest))
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["dataset"] = "bench"
    raw["fetch"].update(processes=PROCESSES, threads=THREADS, shard_size=shard_size, allow_addresses=["127.0.0.0/8"])
    raw["fetch"]["polite"]["robots_txt"] = robots_txt
    params, paths = parse_params(raw), Paths(root)
    urls.run(params, paths)
    started = time.perf_counter()
    summary = fetch.run(params, paths)
    return summary["ok"], time.perf_counter() - started


def _resume_check(server: _Server, base: str, work: Path) -> dict:
    """Drop a 4 MB list download at 40%, resume it: bytes served on the resume vs the bytes still missing."""
    body = os.urandom(4_000_000)
    server.files["/list.csv"], server.served[:] = body, []
    server.drop_after = 1_600_000
    dest, digest = work / "list.csv", hashlib.sha256(body).hexdigest()
    try:
        download_file(f"{base}/list.csv", dest, digest, label="bench", attempts=1)
    except InputError:
        pass  # the dropped attempt, as if the run had been killed there
    have = (work / "list.csv.part").stat().st_size
    download_file(f"{base}/list.csv", dest, digest, label="bench")
    missing_after_drop = len(body) - server.served[0]
    resumed = server.served[-1]
    return {
        "file_bytes": len(body),
        "sent_before_drop": server.served[0],
        "kept_in_part": have,
        "resumed_bytes": resumed,
        "missing_bytes": missing_after_drop,
        "chunk": CHUNK,
        "ok": resumed <= missing_after_drop + CHUNK and dest.read_bytes() == body,
    }


def _address(i: int) -> str:
    """The i-th loopback address: 127.0.0.1, ..., 127.0.0.250, 127.0.1.1, ... (all of 127/8 is loopback)."""
    return f"127.0.{i // 250}.{i % 250 + 1}"


def _peak_rate(starts: list[float]) -> int:
    """The most requests that began within any one second."""
    starts, peak, first = sorted(starts), 0, 0
    for last, t in enumerate(starts):
        while t - starts[first] >= 1.0:
            first += 1
        peak = max(peak, last - first + 1)
    return peak


FETCHERS = ("baseline", "dextra", "dextra_no_robots")


def _fetch_runs(args, files: dict[str, bytes], servers: list[_Server], bases: list[str], tmp: Path) -> dict:
    """`args.reps` runs of each fetcher, their order rotated each rep; per fetcher seconds, images, busiest host."""
    shard_size = max(1, args.images // (2 * PROCESSES))
    list_path = tmp / "urls.parquet"
    paths = sorted(files, key=lambda p: int(p.split("/")[-1].split(".")[0]))
    listed = [bases[i % args.hosts] + p for i, p in enumerate(paths)]
    pq.write_table(pa.table({"url": listed, "text": [f"image {p}" for p in paths]}), list_path)
    runs = {which: {"seconds": [], "ok": [], "peak": []} for which in FETCHERS}
    for rep in range(args.reps):
        for which in FETCHERS[rep % 3 :] + FETCHERS[: rep % 3]:
            work, run = tmp / f"{which}-{rep}", runs[which]
            for server in servers:
                server.starts.clear()
            started = time.perf_counter()
            if which == "baseline":
                run["ok"].append(_baseline(list_path, work, shard_size))
                run["seconds"].append(time.perf_counter() - started)
            else:
                ok, seconds = _dextra(list_path, work, shard_size, robots_txt=which == "dextra")
                run["ok"].append(ok)
                run["seconds"].append(seconds)
            run["peak"].append(max(_peak_rate(server.starts) for server in servers))
            print(f"rep {rep} {which}: {run['seconds'][-1]:.1f} s", file=sys.stderr, flush=True)
    for run in runs.values():
        run["images_per_s"] = [n / s for n, s in zip(run["ok"], run["seconds"])]
    for which in FETCHERS[1:]:
        ratios = [d / b for d, b in zip(runs[which]["images_per_s"], runs["baseline"]["images_per_s"])]
        runs[which].update(ratios=ratios, median_ratio=statistics.median(ratios))
    for run in runs.values():
        run.update(median_images_per_s=statistics.median(run["images_per_s"]), peak=max(run["peak"]))
    return {"shard_size": shard_size, **runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--hosts", type=int, default=128, help="loopback servers the list is spread over")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--small", action="store_true", help="CI's size: 200 images, one paired run; writes under bench/results/small/"
    )
    args = parser.parse_args()
    if args.small:
        args.images, args.reps = 200, 1
    load_before = os.getloadavg()
    polite = parse_params(yaml.safe_load((ROOT / "params.yaml").read_text())).fetch.polite

    files, servers = _images(args.images), []
    for i in range(args.hosts):
        server = _Server((_address(i), 0), _Handler)
        server.files, server.served, server.drop_after, server.starts = files, [], None, []
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    bases = [f"http://{_address(i)}:{server.server_address[1]}" for i, server in enumerate(servers)]
    with tempfile.TemporaryDirectory(prefix="dextra-bench-fetch-") as tmp:
        tmp = Path(tmp)
        runs = _fetch_runs(args, files, servers, bases, tmp)
        resume = _resume_check(servers[0], bases[0], tmp)
    stopping = [threading.Thread(target=server.shutdown) for server in servers]  # each waits up to 0.5 s
    for thread in stopping:
        thread.start()
    for thread in stopping:
        thread.join()

    result = {
        "images": args.images,
        "hosts": args.hosts,
        "processes": PROCESSES,
        "threads": THREADS,
        "reps": args.reps,
        **runs,
        "target": 0.95,
        "polite_requests_per_second": polite.requests_per_second,
        "polite_burst": polite.connections_per_host,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "cpus": os.cpu_count(),
        "resume": resume,
    }
    write_json(Paths(ROOT).bench_result("fetch", args.small), result)
    for which in FETCHERS[1:]:
        run = runs[which]
        print(
            f"fetch: {which} / img2dataset images/s, median of {args.reps}: {run['median_ratio']:.3f} (target >= 0.95;"
            f" each {', '.join(f'{r:.3f}' for r in run['ratios'])}); {run['median_images_per_s']:.0f} vs "
            f"{runs['baseline']['median_images_per_s']:.0f} images/s; busiest host in a second: {run['peak']} "
            f"(img2dataset's {runs['baseline']['peak']}; limit {polite.requests_per_second:g} on average, bursts of "
            f"{polite.connections_per_host})"
        )
    print(
        f"{args.images} images on {args.hosts} hosts, {PROCESSES} processes x {THREADS} threads, load average "
        f"{load_before[0]:.1f} -> {result['load_average_after'][0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(
        f"resumed list download: {resume['resumed_bytes']:,} bytes fetched for {resume['missing_bytes']:,} missing "
        f"(chunk {CHUNK:,}): {'ok' if resume['ok'] else 'FAILED'}"
    )


if __name__ == "__main__":
    main()
