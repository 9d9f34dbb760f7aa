"""New extra data, end to end: what `dvc repro` redoes when a URL list is added, and when it is removed again,
against the full run measured in the same process.

    python bench/incremental.py [--small] [--keep DIR]

The repository's tracked files are copied to a scratch folder (with pretrain.warm_start on, as a user adding data
would set it), and there:
1. full: `dvc repro` from nothing;
2. added: a new URL list of +10% web images (drawn by the demo's web generator with another seed, so none is a copy
   by construction) joins the manifest, and `dvc repro` runs;
3. removed: the list leaves the manifest, and `dvc repro` runs.
Each run's stages and their seconds and items come from the lines the stages print (`dextra <stage>: done in …`).
Fetch's items are the URLs it attempted, embed's the images and captions it embedded. Writes
bench/results/incremental.json (bench/results/small/ with --small, CI's size: the demo shrunk as in the tests).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from dextra.pipeline.atomic import write_json
from dextra.pipeline.demo.seed import seed_images
from dextra.pipeline.demo.web import write_web
from dextra.pipeline.params import merged, parse_params
from dextra.pipeline.paths import Paths
from dextra.pipeline.shards import read_table

ROOT = Path(__file__).resolve().parents[1]
DONE = re.compile(r"^dextra (\w+): done in ([\d.]+)s (\{.*\})$", re.M)
SMALL = {  # the size tests/test_pipeline_dvc.py runs: every stage for real, in a few minutes
    "demo": {"n_seed": 120, "n_web": 200, "n_corpus": 90},
    "fetch": {"processes": 1, "threads": 8},
    "clip": {"train_epochs": 2, "batch_size": 32, "corpus_epochs": 1},
    "curate": {"cluster_detector": False, "class_detector": False, "distance_detector": "on"},
    "train": {"monitor_samples": 0},
    "pretrain": {"steps": 20, "warmup_steps": 2},
    "finetune": {"steps": 10, "warmup_steps": 2},
    "evaluate": {"num_samples": 16, "sampling_steps": 3, "batch_size": 16},
}


def repro(root: Path) -> dict[str, dict]:
    """`dvc repro` in `root`; per stage run, its seconds and summary."""
    result = subprocess.run(["dvc", "repro"], cwd=root, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"bench/incremental.py: dvc repro failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return {
        stage: {"seconds": float(seconds), "summary": json.loads(summary)}
        for stage, seconds, summary in DONE.findall(result.stdout)
    }


def items(stage: str, summary: dict) -> int | None:
    if stage == "fetch":
        return summary.get("new", 0) + summary.get("retried", 0)
    if stage == "embed":
        return sum(summary["embedded"].values())
    return None


def add_list(root: Path, raw: dict, share: float) -> int:
    """A new list of share x demo.n_web web images (50 at least) drawn with another seed; returns its size."""
    params = parse_params(raw)
    n_new = max(50, round(params.demo.n_web * share))  # the demo generator draws 50 at least
    other = parse_params(merged(raw, {"seed": params.seed + 1, "demo": {"n_web": n_new}}))
    test_ids = set(read_table(Paths(root).seed_split("test"), columns=["id"])["id"].to_pylist())
    write_web(other, seed_images(params), test_ids, root / "lists" / "new_web")
    manifest_path = root / "manifests" / f"{params.dataset}.yaml"
    manifest = yaml.safe_load(manifest_path.read_text())
    manifest["sources"].append({**manifest["sources"][0], "name": "new_web", "path": "lists/new_web/urls.csv"})
    manifest_path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return n_new


def remove_list(root: Path, dataset: str) -> None:
    manifest_path = root / "manifests" / f"{dataset}.yaml"
    manifest = yaml.safe_load(manifest_path.read_text())
    manifest["sources"] = [s for s in manifest["sources"] if s["name"] != "new_web"]
    manifest_path.write_text(yaml.safe_dump(manifest, sort_keys=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--small",
        action="store_true",
        help="CI's size: the demo shrunk as in the tests; writes under bench/results/small/",
    )
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    scratch = args.keep or Path(tempfile.mkdtemp(prefix="dextra-incremental-"))
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        if (ROOT / name).is_file() and name != "dvc.lock" and not name.startswith(("metrics/", "bench/results/")):
            (scratch / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, scratch / name)
    raw = merged(yaml.safe_load((ROOT / "params.yaml").read_text()), {"pretrain": {"warm_start": True}})
    raw = merged(raw, SMALL) if args.small else raw
    (scratch / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "-c", "user.name=b", "-c", "user.email=b@b",
                    "commit", "-qm", "bench"]):  # fmt: skip
        subprocess.run(command, cwd=scratch, check=True)  # dvclive needs a commit to stand on
    runs = {"full": repro(scratch)}
    added = add_list(scratch, raw, 0.10)
    runs["added"] = repro(scratch)
    remove_list(scratch, raw["dataset"])
    runs["removed"] = repro(scratch)
    if not args.keep:
        shutil.rmtree(scratch, ignore_errors=True)

    result = {"new_urls": added, "listed_urls": raw["demo"]["n_web"], "runs": {}}
    for name, stages in runs.items():
        result["runs"][name] = {
            stage: {"seconds": r["seconds"], "items": items(stage, r["summary"])} for stage, r in stages.items()
        }
    full = result["runs"]["full"]
    for name in ("added", "removed"):
        ran = result["runs"][name]
        for stage in ("fetch", "embed"):
            if stage in ran and full[stage]["items"]:
                ran[stage]["items_vs_full"] = round(ran[stage]["items"] / full[stage]["items"], 3)
                ran[stage]["seconds_vs_full"] = round(ran[stage]["seconds"] / full[stage]["seconds"], 3)
        print(f"{name}: stages run {sorted(ran)}; total {sum(s['seconds'] for s in ran.values()):.0f} s "
              f"against the full run's {sum(s['seconds'] for s in full.values()):.0f} s")  # fmt: skip
        for stage in ("fetch", "embed"):
            if stage in ran and "items_vs_full" in ran[stage]:
                print(f"  {stage}: {ran[stage]['items']} items ({ran[stage]['items_vs_full']:.1%} of the full run's), "
                      f"{ran[stage]['seconds_vs_full']:.1%} of its seconds")  # fmt: skip
    write_json(Paths(ROOT).bench_result("incremental", args.small), result)


if __name__ == "__main__":
    main()
