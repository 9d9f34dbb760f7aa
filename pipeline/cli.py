"""`dextra <stage>`: the thin command line DVC calls. Each stage's core is `run(params, paths)` in its module."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# stage -> (module with run(params, paths), one paragraph for --help)
STAGES: dict[str, tuple[str, str]] = {
    "seed": (
        "dextra.pipeline.stages.seed",
        "Import the seed set named by `dataset` (its manifest's `seed:`) into data/seed/{train,test}.parquet. "
        "For the demo this generates coloured digits, and the synthetic web the later stages crawl.",
    ),
    "urls": (
        "dextra.pipeline.stages.urls",
        "Read every URL list of the manifest's `sources:` and write data/urls/<source>.parquet with a stable "
        "url_id per URL and the query/class each URL was found with.",
    ),
    "fetch": (
        "dextra.pipeline.stages.fetch",
        "Download the images of every URL never attempted before, with img2dataset, into data/crawl/shards/, "
        "and record one status row per URL in data/crawl/status.parquet.",
    ),
    "clip": (
        "dextra.pipeline.stages.clip",
        "Load the open_clip model named in params (pretrained tag or local checkpoint), optionally train it "
        "contrastively on the seed pairs, and save it to models/clip/.",
    ),
    "embed": (
        "dextra.pipeline.stages.embed",
        "Compute CLIP image embeddings of seed and crawled images and text embeddings of every seed caption, "
        "into data/embeddings/. Shards embedded before with the same model are skipped.",
    ),
    "curate": (
        "dextra.pipeline.stages.curate",
        "Decide which crawled images join the extra set (fetch errors, duplicates, leaks of seed test images, "
        "distance to the seed set) and give each kept image an extrapolated text embedding. Writes "
        "data/curated/decisions.parquet (one row per URL) and data/curated/shards/.",
    ),
    "report": (
        "dextra.pipeline.stages.report",
        "Write data/report/index.html: counts per outcome, score histograms and galleries of kept and dropped images.",
    ),
    "pretrain": (
        "dextra.pipeline.stages.pretrain",
        "Train the text-conditional diffusion model on the curated extra set; weights in models/pretrain/.",
    ),
    "finetune": (
        "dextra.pipeline.stages.finetune",
        "Fine-tune the pretrained model on the seed train set, starting from its EMA weights; "
        "weights in models/finetune/.",
    ),
    "baseline": (
        "dextra.pipeline.stages.baseline",
        "With evaluate.baseline: train the same model from scratch on the seed train set alone, for as many steps as "
        "pretrain and finetune together; weights in models/baseline/. Without it, only leave a note.",
    ),
    "export": (
        "dextra.pipeline.stages.export",
        "Write the curated extra set, and the seed splits with export.include_seed, as webdataset tar shards "
        "(data/export/webdataset/) and a Hugging Face datasets.DatasetDict (data/export/hf/), for other trainers.",
    ),
    "prior": (
        "dextra.pipeline.stages.prior",
        "Train the diffusion prior from caption text embeddings to CLIP image embeddings on the seed pairs and the "
        "curated extra set's pairs, into models/prior/; metrics/prior.json compares it with the text embedding.",
    ),
    "evaluate": (
        "dextra.pipeline.stages.evaluate",
        "Sample images for seed test captions and write CLIP-FD (and FID with evaluate.inception_weights), CLIP "
        "score and GT CLIP score to metrics/eval.json, beside the seed-only baseline's with evaluate.baseline, "
        "with sample grids under dvclive/evaluate/.",
    ),
}

# Commands that are no DVC stage, run by hand: command -> (module with run(params, paths), help).
COMMANDS: dict[str, tuple[str, str]] = {
    "prune": (
        "dextra.pipeline.prune",
        "Delete from data/crawl every fetched URL that no list under data/urls names any more (its status row and "
        "its image). Curate already leaves such URLs out; their images wait on disk in case a list names them again.",
    ),
}


TRAINING_STAGES = ("pretrain", "finetune", "baseline")


def launched(args: argparse.Namespace, params) -> int | None:
    """With train.num_processes > 1, run this training stage under `accelerate launch` and return its exit code, so
    `dvc repro` trains on several GPUs with dvc.yaml's cmd unchanged; None where this process trains by itself (one
    process, or already a worker of a launch, which sets LOCAL_RANK)."""
    train = params.train
    if args.stage not in TRAINING_STAGES or train.num_processes == 1 or "LOCAL_RANK" in os.environ:
        return None
    machines = ["--num_machines", str(train.num_machines), "--machine_rank", str(train.machine_rank)]
    if train.num_machines > 1:
        machines += ["--main_process_ip", train.main_process_ip]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(train.num_processes),
        *machines, "--main_process_port", str(train.main_process_port), "--dynamo_backend", "no",
        "--mixed_precision", "no",  # the trainer's Accelerator sets train.mixed_precision itself
        "-m", "dextra.pipeline.cli", args.stage, "--root", args.root, "--params", args.params,
    ]  # fmt: skip
    return subprocess.run(command).returncode


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dextra",
        description="Grow a small captioned image set with curated web images and train a text-to-image model on it. "
        "Each subcommand is one stage of dvc.yaml; `dvc repro` runs them in order.",
    )
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, (_, help_text) in {**STAGES, **COMMANDS}.items():
        stage = sub.add_parser(name, help=help_text.split(". ")[0].rstrip(".") + ".", description=help_text)
        stage.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        stage.add_argument("--root", default=".", help="repository root that data/ and models/ live under (default: .)")
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    args = build_parser().parse_args(argv)
    from dextra.pipeline.errors import DextraError
    from dextra.pipeline.params import load_params
    from dextra.pipeline.paths import Paths

    try:
        params = load_params(args.params)
        code = launched(args, params)
        if code is not None:
            return code
        module = importlib.import_module({**STAGES, **COMMANDS}[args.stage][0])
        started = time.perf_counter()
        summary = module.run(params, Paths(Path(args.root)))
    except DextraError as exc:
        print(f"dextra {args.stage}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(
        f"dextra {args.stage}: done in {time.perf_counter() - started:.1f}s " + json.dumps(summary or {}, default=str)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
