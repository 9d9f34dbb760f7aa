"""Leak detection on altered copies of the demo's seed test images, per alteration family
(pipeline/demo/alterations.py), for the detector curate uses today (pHash against crop banks, filter/dedup.py) and
the structure-map detector (filter/copies.py), measured in the same run.

    python bench/leak_recall.py [--root .] [--per-family 40] [--small]

Every copy is stored as fetch stores it: img2dataset's Resizer with the fetch params (size, mode, format, quality).
Also scored: altered copies of seed *train* images (a leak detector must not call those leaks of a test image) and
look-alikes (a new handwritten sample of the same digit in the same colours on the same background, which is not a
copy). For the structure maps, recall is given at the threshold that keeps look-alike false alarms at or below 1%,
and at a fixed threshold of 0.92. Writes bench/results/leak_recall.json.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
from img2dataset.resizer import Resizer
from PIL import Image

from dextra.filter.copies import CopyIndex
from dextra.filter.dedup import LeakBank, phash
from dextra.pipeline.atomic import write_json
from dextra.pipeline.demo.alterations import FAMILIES, alter
from dextra.pipeline.demo.draw import compose, digit_mask, draw_texture, encode
from dextra.pipeline.demo.seed import SeedImage, digits, seed_images, seed_order
from dextra.pipeline.params import Params, load_params
from dextra.pipeline.paths import Paths
from dextra.pipeline.shards import read_table

FIXED_THRESHOLD = 0.92
MAX_LOOKALIKE_ALARMS = 0.01


def candidates(
    root: Paths, params: Params, per_family: int, n_train: int
) -> tuple[list[tuple[str, str, str, bytes]], dict[str, SeedImage], list[str]]:
    """(kind, family, source id, stored image) for every copy, train copy and look-alike; the seed images by id; and
    the seed test ids."""
    seed = {s.id: s for s in seed_images(params)}
    test_ids = read_table(root.seed_split("test"), columns=["id"]).column("id").to_pylist()
    train_ids = sorted(set(seed) - set(test_ids))
    fetch = params.fetch
    resizer = Resizer(fetch.image_size, fetch.resize_mode, False, encode_format=fetch.encode_format,
                      encode_quality=fetch.encode_quality)  # fmt: skip

    def stored(pixels: np.ndarray) -> bytes:
        return resizer(io.BytesIO(encode(pixels, "png")))[0]

    rows = []
    for f, family in enumerate(FAMILIES):
        for k in range(per_family):
            rng = np.random.default_rng([params.seed, 20, f, k])
            source = test_ids[int(rng.integers(len(test_ids)))]
            rows.append(("copy", family, source, stored(alter(seed[source].pixels, family, rng)[0])))
    for k in range(n_train):
        rng = np.random.default_rng([params.seed, 21, k])
        source = train_ids[int(rng.integers(len(train_ids)))]
        family = FAMILIES[int(rng.integers(len(FAMILIES)))]
        rows.append(("train_copy", family, source, stored(alter(seed[source].pixels, family, rng)[0])))
    images, target = digits()
    _, web_samples, corpus_samples = seed_order(params)
    unused = web_samples + corpus_samples
    for k, test_id in enumerate(test_ids):
        image, rng = seed[test_id], np.random.default_rng([params.seed, 22, k])
        same_digit = [i for i in unused if str(target[i]) == image.digit]
        mask = digit_mask(images[same_digit[int(rng.integers(len(same_digit)))]], image.pixels.shape[0])
        pixels = compose(mask, image.fg, draw_texture(image.texture, image.bg, *image.pixels.shape[:2], rng))
        rows.append(("lookalike", "", test_id, stored(pixels)))
    return rows, seed, test_ids


def recall_by_family(hit: np.ndarray, kinds: np.ndarray, families: np.ndarray) -> dict[str, float]:
    return {f: float(hit[(kinds == "copy") & (families == f)].mean()) for f in FAMILIES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".")
    parser.add_argument("--per-family", type=int, default=40)
    parser.add_argument("--small", action="store_true", help="CI's size: 3 copies per family")
    args = parser.parse_args(argv)
    root = Paths(Path(args.root).resolve())
    per_family = 3 if args.small else args.per_family
    params = load_params(root.root / "params.yaml")
    rows, images, test_ids = candidates(root, params, per_family, 10 if args.small else 60)
    max_distance = params.curate.leak_hash_distance
    kinds = np.array([r[0] for r in rows])
    families = np.array([r[1] for r in rows])
    sources = np.array([r[2] for r in rows])
    pictures = [np.asarray(Image.open(io.BytesIO(r[3])).convert("RGB")) for r in rows]

    start = time.perf_counter()
    bank = LeakBank(test_ids, [images[i].png for i in test_ids])
    index_s = {"phash": time.perf_counter() - start}
    start = time.perf_counter()
    closest, matched = bank.matches([phash(r[3]) for r in rows], max_distance)
    per_image_s = {"phash": (time.perf_counter() - start) / len(rows)}
    start = time.perf_counter()
    index = CopyIndex(test_ids, [images[i].pixels for i in test_ids])
    index_s["structure"] = time.perf_counter() - start
    start = time.perf_counter()
    scores, owners = index.best(pictures)
    per_image_s["structure"] = (time.perf_counter() - start) / len(rows)

    right_owner = np.array([o >= 0 and test_ids[o] == s for o, s in zip(owners, sources)])
    lookalike_scores = np.sort(scores[kinds == "lookalike"])
    allowed = int(np.floor(MAX_LOOKALIKE_ALARMS * len(lookalike_scores)))
    strict = float(np.nextafter(lookalike_scores[-1 - allowed], np.float32(2))) if len(lookalike_scores) else 1.0
    row_of = {test_id: row for row, test_id in enumerate(test_ids)}
    thresholds = {"structure_fixed": FIXED_THRESHOLD, "structure_1pct_lookalikes": strict}
    detectors = {"phash": np.array([row_of.get(s, -1) in m for s, m in zip(sources, matched)])}
    detectors.update({name: (scores >= t) & right_owner for name, t in thresholds.items()})
    alarms = {"phash": closest <= max_distance, **{name: scores >= t for name, t in thresholds.items()}}
    result = {"copies_per_family": per_family, "structure_thresholds": thresholds, "detectors": {}}
    for name, hit in detectors.items():
        result["detectors"][name] = {
            "recall": recall_by_family(hit, kinds, families),
            "train_copy_false_alarms": int(alarms[name][kinds == "train_copy"].sum()),
            "lookalike_false_alarm_rate": float(alarms[name][kinds == "lookalike"].mean()),
        }
    result["seconds_per_candidate"] = per_image_s
    result["index_seconds"] = index_s
    result["reference_views"] = int(index.index.ntotal)
    phash_recall = result["detectors"]["phash"]["recall"]
    for name, r in result["detectors"].items():
        print(f"{name:18} train-copy alarms {r['train_copy_false_alarms']:3}  look-alike alarms "
              f"{r['lookalike_false_alarm_rate']:.3f}")  # fmt: skip
        print("  " + "  ".join(f"{f} {v:.2f}" for f, v in r["recall"].items()))
    for name in detectors:
        if name != "phash":
            ratios = {
                f: v / phash_recall[f] if phash_recall[f] else None
                for f, v in result["detectors"][name]["recall"].items()
            }
            print(
                f"{name} recall ÷ pHash: "
                + "  ".join(f"{f} {'inf' if v is None else f'{v:.2f}'}" for f, v in ratios.items())
            )
    print(f"ms per candidate: pHash {per_image_s['phash'] * 1e3:.2f}, structure {per_image_s['structure'] * 1e3:.2f}")
    write_json(root.bench_result("leak_recall", args.small), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
