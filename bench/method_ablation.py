"""The paper's comparison on a finished demo: the same model at equal total steps, with several training seeds each,
pretrained on five kinds of extra data and fine-tuned on seed train (or trained on seed train alone).

    python bench/method_ablation.py [--root .] [--seeds 3] [--variants NAME ...] [--small]

Variants:
- seed_only: the `baseline` stage, pretrain.steps + finetune.steps on seed train alone;
- raw_web: pretrain on every fetched web image with its alt text's CLIP embedding (duplicates, leaks and outliers
  included), then finetune;
- curated_alt_text: the curated images with their alt text's embedding;
- curated_extrapolated: the method, the curated images with their extrapolated text embeddings;
- curated_nearest_caption: curate again with curate.k_neighbors = 1 (the nearest seed image's caption).

Each run trains in a scratch project whose data/ links the root's, except data/curated, which the variant writes.
Training seeds are the root's seed plus 0, 1, 2, ...; every run is evaluated with the root's own params, so all runs
are scored on the same test captions, from the same noise, by the same judge. Writes
bench/results/method_ablation.json: {"variants": {name: {metric: {"mean", "std", "runs"}}}, "method_vs": ...}, where
method_vs says by how much curated_extrapolated beats each other variant, in pooled standard deviations.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa

from dextra.filter.clip import load_clip
from dextra.pipeline.atomic import write_json
from dextra.pipeline.errors import InputError
from dextra.pipeline.params import Params, load_params, merged, parse_params
from dextra.pipeline.paths import Paths
from dextra.pipeline.shards import CURATED_SCHEMA, read_table, shard_files, write_table
from dextra.pipeline.stages import baseline, curate, evaluate, finetune, pretrain

VARIANTS = ("seed_only", "raw_web", "curated_alt_text", "curated_extrapolated", "curated_nearest_caption")
METRICS = {"clip_fd": -1, "clip_score": 1, "caption_accuracy": 1}  # sign: +1 where higher is better
LINKED = ("seed", "urls", "crawl", "embeddings")
SMALL = {  # CI's size: every variant and code path for real, in a few minutes
    "pretrain": {"steps": 4, "warmup_steps": 1},
    "finetune": {"steps": 2, "warmup_steps": 0},
    "evaluate": {"num_samples": 16, "sampling_steps": 4},
}


def project(folder: Path, root: Path) -> Paths:
    """A scratch project in `folder` that reads the root's data, CLIP and training cache."""
    (folder / "data").mkdir(parents=True)
    (folder / "models").mkdir()
    (folder / "checkpoints").mkdir()
    for part in LINKED:
        (folder / "data" / part).symlink_to(root / "data" / part)
    (folder / "manifests").symlink_to(root / "manifests")
    (folder / "models" / "clip").symlink_to(root / "models" / "clip")
    (folder / "checkpoints" / "cache").symlink_to(root / "checkpoints" / "cache")
    return Paths(folder)


def with_alt_text(tables: list[tuple[Path, pa.Table]], clip_folder: Path, out: Path) -> int:
    """Write each table as a curated shard under `out` whose text_embedding is its first caption's (the alt text's)
    CLIP embedding; rows without a caption are left out. Returns the rows written."""
    bundle = load_clip(clip_folder)
    written = 0
    for path, table in tables:
        captions = table.column("captions").to_pylist()
        table = table.filter(pa.array([bool(c) for c in captions]))
        texts = [c[0] for c in captions if c]
        vectors = bundle.encode_texts(texts) if texts else np.zeros((0, bundle.embed_dim), np.float32)
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        columns = {
            "text_embedding": pa.array(list(vectors.astype(np.float16)), CURATED_SCHEMA.field("text_embedding").type),
            "neighbor_ids": pa.array([[] for _ in texts], pa.list_(pa.string())),
            "neighbor_weights": pa.array([[] for _ in texts], pa.list_(pa.float32())),
            "neighbor_captions": pa.array([[] for _ in texts], pa.list_(pa.string())),
        }
        for name, column in columns.items():
            index = table.schema.get_field_index(name)
            table = table.set_column(index, name, column) if index >= 0 else table.append_column(name, column)
        write_table(table.select(CURATED_SCHEMA.names), out / path.name, CURATED_SCHEMA)
        written += table.num_rows
    return written


def extra_set(variant: str, root: Paths, scratch: Path, params: Params) -> Path | None:
    """The data/curated folder `variant` pretrains on (None for seed_only), written under `scratch` where needed."""
    if variant == "seed_only":
        return None
    if variant == "curated_extrapolated":
        return root.curated
    paths = project(scratch / f"extra-{variant}", root.root)
    if variant == "curated_nearest_caption":
        curate.run(params.model_copy(update={"curate": params.curate.model_copy(update={"k_neighbors": 1})}), paths)
    else:
        source = root.crawl_shards if variant == "raw_web" else root.curated_shards
        tables = [(f, read_table(f)) for f in shard_files(source)]
        paths.curated_shards.mkdir(parents=True)
        rows = with_alt_text(tables, root.clip, paths.curated_shards)
        print(f"{variant}: {rows} images with their alt text", flush=True)
    return paths.curated


def train_and_score(variant: str, extra: Path | None, seed: int, root: Paths, folder: Path, raw: dict) -> dict:
    """One run: train `variant` with training seed `seed` in a scratch project, evaluate it with the root's params."""
    paths = project(folder, root.root)
    if extra is not None:
        (paths.root / "data" / "curated").symlink_to(extra)
    steps = raw["pretrain"]["steps"] + raw["finetune"]["steps"]
    quiet = {"train": {"monitor_samples": 0, "grid_samples": 0, "checkpoint_every": steps}}
    training = parse_params(merged(raw, {**quiet, "seed": seed}))
    if extra is None:
        baseline.run(training, paths)
        paths.model("finetune").symlink_to(paths.model("baseline"))
    else:
        pretrain.run(training, paths)
        finetune.run(training, paths)
    scores = evaluate.run(parse_params(merged(raw, {"evaluate": {"baseline": False}})), paths)
    return {name: scores[name] for name in METRICS}


def summarise(runs: list[dict]) -> dict:
    return {
        name: {
            "mean": statistics.fmean(r[name] for r in runs),
            "std": statistics.stdev([r[name] for r in runs]) if len(runs) > 1 else 0.0,
            "runs": [r[name] for r in runs],
        }
        for name in METRICS
    }


def method_versus(variants: dict) -> dict:
    """For each other variant and metric: how much better the method's mean is (signed so that > 0 is better), and
    that margin in pooled standard deviations."""
    method, out = variants["curated_extrapolated"], {}
    for name, other in variants.items():
        if name == "curated_extrapolated":
            continue
        out[name] = {}
        for metric, sign in METRICS.items():
            margin = sign * (method[metric]["mean"] - other[metric]["mean"])
            pooled = ((method[metric]["std"] ** 2 + other[metric]["std"] ** 2) / 2) ** 0.5
            spread = margin / pooled if pooled else None
            out[name][metric] = {"margin": margin, "pooled_std": pooled, "in_pooled_stds": spread}
    return out


def _margin(value: dict) -> str:
    spread = "-" if value["in_pooled_stds"] is None else f"{value['in_pooled_stds']:+.1f}"
    return f"{value['margin']:+.4f} ({spread} sd)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per variant")
    parser.add_argument("--small", action="store_true", help="CI's size (2 seeds, a few steps); bench/results/small/")
    parser.add_argument(
        "--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="a subset (curated_extrapolated always)"
    )
    args = parser.parse_args(argv)
    root = Paths(Path(args.root).resolve())
    if not shard_files(root.curated_shards) or not root.clip.is_dir():
        raise InputError(f"{root.curated_shards}: no curated shards or CLIP model; run `dvc repro` first")
    raw = load_params(root.root / "params.yaml").model_dump()
    seeds = 2 if args.small else args.seeds
    if args.small:
        raw = merged(raw, SMALL)
    params = parse_params(raw)
    variants = {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for variant in [v for v in VARIANTS if v in {*args.variants, "curated_extrapolated"}]:
            extra = extra_set(variant, root, scratch, params)
            runs = []
            for k in range(seeds):
                runs.append(train_and_score(variant, extra, params.seed + k, root, scratch / f"{variant}-{k}", raw))
                print(f"{variant:24} seed {params.seed + k}: " + "  ".join(f"{m} {v:.4f}" for m, v in runs[-1].items()))
            variants[variant] = summarise(runs)
            for folder in scratch.glob(f"{variant}-*"):
                shutil.rmtree(folder)
    result = {
        "seeds": seeds,
        "steps": {"pretrain": params.pretrain.steps, "finetune": params.finetune.steps},
        "variants": variants,
        "method_vs": method_versus(variants),
    }
    for name, metrics in result["method_vs"].items():
        print(f"method vs {name:24} " + "  ".join(f"{m} {_margin(v)}" for m, v in metrics.items()))
    write_json(root.bench_result("method_ablation", args.small), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
