"""Fetch throughput: `dextra fetch` (the guard in every worker, the per-host limits and robots.txt, the per-shard
commits, the status record) against a direct `img2dataset.download` call on the same URL list, spread over
`--hosts` loopback servers (127.0.0.1, 127.0.0.2, ...: separate hosts to the crawler, each also asked once for its
robots.txt; enough of them that no host nears fetch.polite.requests_per_second on average), with the same processes,
threads, shard size and image policy, in one process, alternating, `--reps` times each. Prints the median ratio
of images/s (target >= 0.95) and the highest request rate any one host saw in a second (fetch.polite keeps it
at most requests_per_second). Also checks that a resumed URL-list download fetches no more than the missing
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


def _dextra(list_path: Path, root: Path, shard_size: int) -> tuple[int, float]:
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
    shard_size = max(1, args.images // (2 * PROCESSES))
    load_before = os.getloadavg()

    files, servers = _images(args.images), []
    for i in range(args.hosts):
        server = _Server((_address(i), 0), _Handler)
        server.files, server.served, server.drop_after, server.starts = files, [], None, []
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    bases = [f"http://{_address(i)}:{server.server_address[1]}" for i, server in enumerate(servers)]
    baseline_s, dextra_s, baseline_ok, dextra_ok, peak_rates = [], [], [], [], []
    with tempfile.TemporaryDirectory(prefix="dextra-bench-fetch-") as tmp:
        tmp = Path(tmp)
        list_path = tmp / "urls.parquet"
        paths = sorted(files, key=lambda p: int(p.split("/")[-1].split(".")[0]))
        listed = [bases[i % args.hosts] + p for i, p in enumerate(paths)]
        pq.write_table(pa.table({"url": listed, "text": [f"image {p}" for p in paths]}), list_path)
        for rep in range(args.reps):
            for which in ("baseline", "dextra") if rep % 2 == 0 else ("dextra", "baseline"):
                work = tmp / f"{which}-{rep}"
                for server in servers:
                    server.starts.clear()
                if which == "baseline":
                    started = time.perf_counter()
                    baseline_ok.append(_baseline(list_path, work, shard_size))
                    baseline_s.append(time.perf_counter() - started)
                else:
                    ok, seconds = _dextra(list_path, work, shard_size)
                    dextra_ok.append(ok)
                    dextra_s.append(seconds)
                    peak_rates.append(max(_peak_rate(server.starts) for server in servers))
                print(
                    f"rep {rep} {which}: {(baseline_s if which == 'baseline' else dextra_s)[-1]:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
        resume = _resume_check(servers[0], bases[0], tmp)
    for server in servers:
        server.shutdown()
    polite = parse_params(yaml.safe_load((ROOT / "params.yaml").read_text())).fetch.polite

    baseline_ips = [n / s for n, s in zip(baseline_ok, baseline_s)]
    dextra_ips = [n / s for n, s in zip(dextra_ok, dextra_s)]
    ratios = [d / b for d, b in zip(dextra_ips, baseline_ips)]
    result = {
        "images": args.images,
        "hosts": args.hosts,
        "processes": PROCESSES,
        "threads": THREADS,
        "shard_size": shard_size,
        "reps": args.reps,
        "baseline_seconds": baseline_s,
        "dextra_seconds": dextra_s,
        "baseline_ok": baseline_ok,
        "dextra_ok": dextra_ok,
        "baseline_images_per_s": statistics.median(baseline_ips),
        "dextra_images_per_s": statistics.median(dextra_ips),
        "ratios": ratios,
        "median_ratio": statistics.median(ratios),
        "target": 0.95,
        "dextra_peak_requests_per_host_second": max(peak_rates),
        "polite_requests_per_second": polite.requests_per_second,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "cpus": os.cpu_count(),
        "resume": resume,
    }
    write_json(Paths(ROOT).bench_result("fetch", args.small), result)
    print(
        f"fetch: dextra / img2dataset images/s, median of {args.reps} paired runs: "
        f"{result['median_ratio']:.3f} (target >= 0.95; "
        f"per pair {', '.join(f'{r:.3f}' for r in ratios)}); medians {result['dextra_images_per_s']:.0f} vs "
        f"{result['baseline_images_per_s']:.0f} images/s; load average {load_before[0]:.1f} -> "
        f"{result['load_average_after'][0]:.1f} "
        f"on {os.cpu_count()} CPUs; {args.images} images on {args.hosts} hosts, the busiest host got at most "
        f"{result['dextra_peak_requests_per_host_second']} requests in a second "
        f"(fetch.polite.requests_per_second: {polite.requests_per_second:g})"
    )
    print(
        f"resumed list download: {resume['resumed_bytes']:,} bytes fetched for {resume['missing_bytes']:,} missing "
        f"(chunk {CHUNK:,}): {'ok' if resume['ok'] else 'FAILED'}"
    )


if __name__ == "__main__":
    main()
