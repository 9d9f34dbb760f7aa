"""Leak detection on altered copies of the demo's seed test images, per alteration family
(pipeline/demo/alterations.py): alignment (filter/copies.py, what curate uses) against the pHash crop banks it
replaced (filter/dedup.py's LeakBank), measured in the same run.

    python bench/leak_recall.py [--root .] [--per-family 40] [--train-copies 300] [--stored-side 32] [--small]

Every copy is stored as fetch stores it: img2dataset's Resizer with the fetch params (size, mode, format, quality).
Also scored: altered copies of seed *train* images (a leak detector must not call those leaks of a test image) and
look-alikes (a new handwritten sample of the same digit in the same colours on the same background, which is not a
copy). Curate verifies each crawled image against the curate.leak_candidates test images CLIP ranks nearest and the
curate.leak_proposals that CopyIndex.propose finds; here each copy and look-alike is verified against its own test
image, leak_candidates - 1 others drawn at random and those proposed (CLIP's ranking is assumed: the demo's curate
measures the whole), and each train copy against every test image. Recall is
given at curate.leak_copy_score and at the threshold that keeps look-alike alarms at 1%. Seconds are per candidate
(leak_candidates pairs), and the cost of 1M crawled images against 10k test images is estimated from the per-pair
times and the share of non-copies that pass the gate. Writes bench/results/leak_recall.json.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
from img2dataset.resizer import Resizer

from dextra.filter.copies import Candidate, CopyIndex, decode, one_thread
from dextra.filter.dedup import LeakBank, phash
from dextra.pipeline.atomic import write_json
from dextra.pipeline.demo.alterations import FAMILIES, alter
from dextra.pipeline.demo.draw import compose, digit_mask, draw_texture, encode
from dextra.pipeline.demo.seed import SeedImage, digits, seed_images, seed_order
from dextra.pipeline.params import Params, load_params
from dextra.pipeline.paths import Paths
from dextra.pipeline.shards import read_table

PHASH_DISTANCE = 8  # the pHash bits the replaced detector allowed
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
    parser.add_argument("--train-copies", type=int, default=300, help="altered copies of seed train images")
    parser.add_argument("--stored-side", type=int, help="store copies at this side, not fetch.image_size")
    parser.add_argument("--small", action="store_true", help="CI's size: 3 copies per family")
    args = parser.parse_args(argv)
    root = Paths(Path(args.root).resolve())
    per_family = 3 if args.small else args.per_family
    params = load_params(root.root / "params.yaml")
    if args.stored_side:
        params = params.model_copy(update={"fetch": params.fetch.model_copy(update={"image_size": args.stored_side})})
    cfg = params.curate
    rows, images, test_ids = candidates(root, params, per_family, 10 if args.small else args.train_copies)
    kinds = np.array([r[0] for r in rows])
    families = np.array([r[1] for r in rows])
    sources = np.array([r[2] for r in rows])
    row_of = {test_id: row for row, test_id in enumerate(test_ids)}

    start = time.perf_counter()
    bank = LeakBank(test_ids, [images[i].png for i in test_ids])
    index_s = {"phash": time.perf_counter() - start}
    start = time.perf_counter()
    closest, matched = bank.matches([phash(r[3]) for r in rows], PHASH_DISTANCE)
    per_image_s = {"phash": (time.perf_counter() - start) / len(rows)}

    copies = CopyIndex(test_ids, [images[i].pixels for i in test_ids])
    start = time.perf_counter()
    for row in range(len(test_ids)):
        copies.best(images[test_ids[row]].pixels, [row], 1.0)  # prepares every reference
    index_s["alignment"] = time.perf_counter() - start
    rng = np.random.default_rng(params.seed)
    scores, timed, refined, coarse_pairs, coarse_s, propose_s = np.zeros(len(rows)), [], [], 0, 0.0, 0.0
    for i, (kind, _, source, data) in enumerate(rows):
        pixels = decode(data)
        if kind == "train_copy":
            start = time.perf_counter()
            with one_thread():
                candidate = Candidate(pixels)
                coarse, fine = copies.score(candidate, range(len(test_ids)), cfg.leak_gate)
                coarse_s += time.perf_counter() - start
                start = time.perf_counter()
                proposed = copies.propose(candidate, cfg.leak_proposals)
                propose_s += time.perf_counter() - start
            coarse_pairs += len(test_ids)
            drawn = [*rng.choice(len(test_ids), cfg.leak_candidates, False), *proposed]
            refined.append(coarse[drawn].max() >= cfg.leak_gate)
            scores[i] = np.nanmax(fine) if np.isfinite(fine).any() else coarse.max()  # as CopyIndex.best
            continue
        others = rng.choice([r for r in range(len(test_ids)) if r != row_of[source]], cfg.leak_candidates - 1, False)
        start = time.perf_counter()
        with one_thread():
            scores[i], found = copies.best(pixels, [row_of[source], *others], cfg.leak_gate, cfg.leak_proposals)
        timed.append(time.perf_counter() - start)
        if kind == "copy" and found != row_of[source]:
            scores[i] = 0.0  # a copy must be found as a copy of its source; a look-alike is an alarm on any test image
    per_image_s["alignment"] = float(np.mean(timed))

    lookalike_scores = np.sort(scores[kinds == "lookalike"])
    allowed = int(np.floor(MAX_LOOKALIKE_ALARMS * len(lookalike_scores)))
    strict = float(np.nextafter(lookalike_scores[-1 - allowed], 2.0)) if len(lookalike_scores) else 1.0
    thresholds = {"alignment": cfg.leak_copy_score, "alignment_1pct_lookalikes": strict}
    detectors = {"phash": np.array([row_of.get(s, -1) in m for s, m in zip(sources, matched)])}
    detectors.update({name: scores >= t for name, t in thresholds.items()})
    alarms = {"phash": closest <= PHASH_DISTANCE, **{name: scores >= t for name, t in thresholds.items()}}
    result = {"copies_per_family": per_family, "train_copies": int((kinds == "train_copy").sum()),
              "thresholds": thresholds, "detectors": {}}  # fmt: skip
    for name, hit in detectors.items():
        result["detectors"][name] = {
            "recall": recall_by_family(hit, kinds, families),
            "train_copy_false_alarms": int(alarms[name][kinds == "train_copy"].sum()),
            "lookalike_false_alarm_rate": float(alarms[name][kinds == "lookalike"].mean()),
        }
    # cost at scale: every crawled image is compared whole with every test image (propose), checked coarsely against
    # leak_candidates + leak_proposals test images, and its best pair is refined if it passes the gate (the share of
    # train copies whose best coarse score against leak_candidates random and the proposed test images passes; a
    # copy's time, less its proposal and coarse pairs, gives the refinement's)
    checked = cfg.leak_candidates + cfg.leak_proposals
    pass_rate = float(np.mean(refined)) if refined else 0.0
    coarse_pair_s = coarse_s / max(1, coarse_pairs)
    propose_pair_s = propose_s / max(1, len(refined) * len(test_ids))
    refine_s = max(0.0, per_image_s["alignment"] - checked * coarse_pair_s - len(test_ids) * propose_pair_s)
    crawled, tests = 1_000_000, 10_000
    result["cost"] = {
        "coarse_seconds_per_pair": coarse_pair_s,
        "propose_seconds_per_pair": propose_pair_s,
        "refine_seconds": refine_s,
        "non_copy_refined_share": pass_rate,
        "1M_x_10k": {
            "pairs_proposed": crawled * tests,
            "pairs_coarse": crawled * checked,
            "pairs_refined_estimate": crawled * pass_rate,
            "seconds_estimate": crawled * tests * propose_pair_s
            + crawled * checked * coarse_pair_s
            + crawled * pass_rate * refine_s
            + tests * index_s["alignment"] / len(test_ids),
        },
    }
    result["seconds_per_candidate"] = per_image_s
    result["index_seconds"] = index_s
    phash_recall = result["detectors"]["phash"]["recall"]
    for name, r in result["detectors"].items():
        print(f"{name:26} train-copy alarms {r['train_copy_false_alarms']:3}  look-alike alarms "
              f"{r['lookalike_false_alarm_rate']:.3f}")  # fmt: skip
        print("  " + "  ".join(f"{f} {v:.2f}" for f, v in r["recall"].items()))
    for name in thresholds:
        ratios = {
            f: v / phash_recall[f] if phash_recall[f] else None for f, v in result["detectors"][name]["recall"].items()
        }
        print(
            f"{name} recall ÷ pHash: "
            + "  ".join(f"{f} {'inf' if v is None else f'{v:.2f}'}" for f, v in ratios.items())
        )
    print(
        f"ms per candidate: pHash {per_image_s['phash'] * 1e3:.2f}, alignment {per_image_s['alignment'] * 1e3:.2f} "
        f"({cfg.leak_candidates} pairs); coarse ms per pair {coarse_pair_s * 1e3:.2f}, refinement ms "
        f"{refine_s * 1e3:.1f}, non-copies refined {pass_rate:.3f}"
    )
    scale = result["cost"]["1M_x_10k"]
    print(
        f"1M crawled x 10k test: {scale['pairs_proposed']:.3g} pairs compared whole, {scale['pairs_coarse']:.3g} "
        f"checked, {scale['pairs_refined_estimate']:.3g} refined, about {scale['seconds_estimate']:.3g} s on one core"
    )
    write_json(root.bench_result("leak_recall", args.small), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
