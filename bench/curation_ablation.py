"""The paper's ablation on the demo's ground truth: curation quality with each detector switched off, and with
k = 1, 5, 10 seed neighbours for the text extrapolation, every variant scored in the same run.

    python bench/curation_ablation.py [--root .]

Runs `curate` (its real `run`) per variant in a scratch root that links the root's data/urls, data/crawl,
data/embeddings and data/seed, and scores it with bench/curation_quality.py's rules.
Writes bench/results/curation_ablation.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

from dextra.pipeline.atomic import write_json
from dextra.pipeline.params import load_params
from dextra.pipeline.paths import Paths
from dextra.pipeline.stages import curate

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("curation_quality", HERE / "curation_quality.py")
quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)

VARIANTS = {
    "as configured": {},
    "no cluster detector": {"cluster_detector": False},
    "no class detector": {"class_detector": False},
    "no distance detector": {"distance_detector": "off"},
    "all detectors (distance on)": {"cluster_detector": True, "class_detector": True, "distance_detector": "on"},
    "no detector": {"cluster_detector": False, "class_detector": False, "distance_detector": "off"},
    "k = 1": {"k_neighbors": 1},
    "k = 5": {"k_neighbors": 5},
    "k = 10": {"k_neighbors": 10},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".")
    parser.add_argument(
        "--small",
        action="store_true",
        help="CI's size: the configured variant and one other; writes under bench/results/small/",
    )
    args = parser.parse_args()
    root = Path(args.root).resolve()
    params = load_params(root / "params.yaml")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for part in ("urls", "crawl", "embeddings", "seed"):
            (scratch / "data").mkdir(exist_ok=True)
            (scratch / "data" / part).symlink_to(root / "data" / part)
        variants = dict(list(VARIANTS.items())[:2]) if args.small else VARIANTS
        for name, overrides in variants.items():
            variant = params.model_copy(update={"curate": params.curate.model_copy(update=overrides)})
            curate.run(variant, Paths(scratch))
            scores = quality.score(*quality.load(scratch))
            rows.append(
                {
                    "variant": name,
                    "precision": scores["kept"]["precision"],
                    "recall": scores["kept"]["recall"],
                    "kept": scores["kept"]["kept"],
                    "class_accuracy": scores["extrapolation"]["class_accuracy"],
                    "color_accuracy": scores["extrapolation"]["color_accuracy"],
                    "condition_accuracy": scores["condition"]["all_accuracy"],
                    "leaks_kept": scores["leak"]["kept"],
                }
            )
            fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
            r = rows[-1]
            print(
                f"{name:28} precision {fmt(r['precision'])}  recall {fmt(r['recall'])}  kept {r['kept']:5}  "
                f"class acc {fmt(r['class_accuracy'])}  colour acc {fmt(r['color_accuracy'])}  "
                f"text all three {fmt(r['condition_accuracy'])}  "
                f"leaks kept {r['leaks_kept']}",
                flush=True,
            )
    write_json(Paths(root).bench_result("curation_ablation", args.small), {"variants": rows})


if __name__ == "__main__":
    sys.exit(main())
