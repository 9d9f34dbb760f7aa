"""Rebuild the README's benchmark table from bench/results/*.json (the numbers the benchmarks wrote).

python bench/readme_table.py
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- bench-table -->", "<!-- /bench-table -->"


def rows_curation_quality(r: dict) -> list[tuple[str, str, str]]:
    kept, base, extra, leak, dup = r["kept"], r["baseline_keep_fetched"], r["extrapolation"], r["leak"], r["duplicates"]
    condition = r["condition"]
    return [
        (
            "curation: kept precision",
            f"{kept['precision']:.3f}",
            f"{kept['precision'] / base['precision']:.2f}× keep-everything ({base['precision']:.3f})",
        ),
        ("curation: kept recall", f"{kept['recall']:.3f}", f"keep-everything {base['recall']:.3f}"),
        (
            "curation: duplicate groups kept more than once",
            f"{dup['groups_kept_more_than_once']}",
            f"of {dup['groups']} groups with copies; {dup['extra_copies_kept']} extra copies kept",
        ),
        (
            "curation: extrapolation class / colour accuracy",
            f"{extra['class_accuracy']:.3f} / {extra['color_accuracy']:.3f}",
            f"over {extra['images']} kept in-domain images",
        ),
        (
            "curation: text feature read as digit / colour / background",
            f"{condition['digit_accuracy']:.3f} / {condition['fg_accuracy']:.3f} / {condition['bg_accuracy']:.3f}",
            f"all three {condition['all_accuracy']:.3f}: nearest seed caption to the generator's condition",
        ),
        (
            "curation: leak recall (leaks kept)",
            f"{leak['recall']:.3f} ({leak['kept']})",
            f"of {leak['leak_urls']} seed-test near-copies",
        ),
    ]


def rows_curation_ablation(r: dict) -> list[tuple[str, str, str]]:
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    return [
        (
            f"ablation: {v['variant']}",
            f"P {fmt(v['precision'])} / R {fmt(v['recall'])}",
            f"class acc {fmt(v['class_accuracy'])}, text all three {fmt(v['condition_accuracy'])}, "
            f"leaks kept {v['leaks_kept']}",
        )
        for v in r["variants"]
    ]


def rows_embed(r: dict) -> list[tuple[str, str, str]]:
    return [
        (
            "embed: stage ÷ model-only images/s",
            f"{r['ratio']:.2f}",
            f"{r['stage_images_per_s']:.0f} vs {r['model_only_images_per_s']:.0f} images/s, "
            f"{r['device']}, batch {r['batch_size']}",
        )
    ] + (
        [
            (
                "embed: stage ÷ model-only images/s, ViT-B-32 at 224 px",
                f"{r['vit_b_32']['ratio']:.2f}",
                f"{r['vit_b_32']['stage_images_per_s']:.0f} vs {r['vit_b_32']['model_only_images_per_s']:.0f} "
                f"images/s, {r['device']}, batch {r['vit_b_32']['batch_size']}, random weights",
            )
        ]
        if "vit_b_32" in r
        else []
    )


def rows_gpu(r: dict) -> list[tuple[str, str, str]]:
    return [
        ("GPU embed: stage ÷ model-only, ViT-B-32 224 px", f"{r['embed']['ratio']:.2f}", r["device"]),
        ("GPU train: trainer ÷ synthetic steps/s, DiT-L/2-like", f"{r['train']['ratio']:.2f}", r["device"]),
        (
            f"GPU curate core: {r['curate']['crawled']:,} crawled",
            f"{r['curate']['seconds']:.0f} s",
            r["curate"]["faiss"],
        ),  # noqa: E501
    ]


def rows_curate_scale(r: dict) -> list[tuple[str, str, str]]:
    rows = [
        (
            f"curate core: {run['crawled']:,} crawled" + (f" ({run['commit']})" if "commit" in run else ""),
            f"{run['seconds']:.0f} s"
            + (
                f" ({run['cpu_seconds']:.0f} CPU s, load {max(run['load_average_1min']):.1f})"
                if "cpu_seconds" in run
                else ""
            ),
            f"peak RSS {run['peak_rss_gib']:.2f} GiB"
            + (f" (anonymous {run['peak_anon_rss_gib']:.2f} GiB)" if "peak_anon_rss_gib" in run else ""),
        )
        for run in r["runs"]
    ]
    if "time_growth" in r:
        rows.append(("curate core: time growth", f"{r['time_growth']:.1f}×", f"for {r['size_growth']:.0f}× the crawl"))
    return rows


def rows_fetch(r: dict) -> list[tuple[str, str, str]]:
    resume, base = r["resume"], r["baseline"]
    setting = (
        f"median of {r['reps']}, {r['processes']} processes × {r['threads']} threads, {r['images']:,} images on "
        f"{r['hosts']} loopback hosts, per-host limits on"
    )
    return [
        (
            "fetch: dextra ÷ plain img2dataset images/s",
            f"{r['dextra']['median_ratio']:.2f}",
            f"{setting}, robots.txt read ({r['hosts']} requests more); "
            f"{r['dextra']['median_images_per_s']:.0f} vs {base['median_images_per_s']:.0f} images/s",
        ),
        (
            "fetch: dextra without robots.txt ÷ plain img2dataset",
            f"{r['dextra_no_robots']['median_ratio']:.2f}",
            f"{setting}; {r['dextra_no_robots']['median_images_per_s']:.0f} images/s",
        ),
        (
            "fetch: busiest host, requests in one second",
            f"{r['dextra']['peak']}",
            f"plain img2dataset's {base['peak']}; fetch.polite.requests_per_second: "
            f"{r['polite_requests_per_second']:g} on average, bursts of {r['polite_burst']}",
        ),
        (
            "fetch: resumed list download",
            f"{resume['resumed_bytes']:,} B",
            f"missing {resume['missing_bytes']:,} B (chunk {resume['chunk']:,} B)",
        ),
    ]


def rows_train(r: dict) -> list[tuple[str, str, str]]:
    rows = []
    for name, run in (("pixels", r.get("pixels")), ("latents", r.get("latents"))):
        if run:
            speedup = run["dextra_images_per_s"] / run["baseline_images_per_s"]
            rows.append(
                (
                    f"pretrain ÷ diffusers-example loop ({name}, {run['resolution']} px)",
                    f"{speedup:.2f}",
                    f"{run['dextra_images_per_s']:.0f} vs {run['baseline_images_per_s']:.0f} images/s, "
                    f"batch {r['batch_size']}, {r['device']}",
                )
            )
    return rows


def rows_method_ablation(r: dict) -> list[tuple[str, str, str]]:
    def cell(metrics: dict, name: str) -> str:
        return f"{metrics[name]['mean']:.3f} ± {metrics[name]['std']:.3f}"

    return [
        (
            f"method: {variant}",
            f"caption acc {cell(m, 'caption_accuracy')}",
            f"CLIP-FD {cell(m, 'clip_fd')}, CLIP score {cell(m, 'clip_score')}; {r['seeds']} seeds, "
            f"{r['steps']['pretrain']} + {r['steps']['finetune']} steps",
        )
        for variant, m in r["variants"].items()
    ]


def rows_leak_recall(r: dict) -> list[tuple[str, str, str]]:
    names = {"phash": "pHash crop banks (replaced)", "alignment": "alignment (curate, leak_copy_score)",
             "alignment_1pct_lookalikes": "alignment, ≤1% look-alike alarms"}  # fmt: skip
    rows = []
    for name, d in r["detectors"].items():
        recall = d["recall"]
        threshold = r["thresholds"].get(name)
        rows.append(
            (
                f"leak recall: {names.get(name, name)}" + (f" ({threshold:.3f})" if threshold else ""),
                f"min {min(recall.values()):.2f} / mean {sum(recall.values()) / len(recall):.2f}",
                ", ".join(f"{f} {v:.2f}" for f, v in recall.items())
                + f"; alarms on look-alikes {d['lookalike_false_alarm_rate']:.3f}, on train copies "
                f"{d['train_copy_false_alarms']} of {r['train_copies']}",
            )
        )
    cost, scale = r["cost"], r["cost"]["1M_x_10k"]
    per_pair = (
        f"whole-picture proposal {cost['propose_seconds_per_pair'] * 1e6:.1f} µs a pair, coarse "
        f"{cost['coarse_seconds_per_pair'] * 1e3:.2f} ms a pair, refinement {cost['refine_seconds'] * 1e3:.1f} ms"
    )
    at_scale = (
        f"1M crawled x 10k test: {scale['pairs_proposed']:.2g} pairs compared whole, {scale['pairs_coarse']:.2g} "
        f"checked, {scale['pairs_refined_estimate']:.2g} refined, about {scale['seconds_estimate']:.2g} s on one core"
    )
    rows.append(
        (
            "leak check cost (alignment)",
            f"{r['seconds_per_candidate']['alignment'] * 1e3:.1f} ms a copy",
            f"{per_pair}; {at_scale}",
        )
    )
    return rows


def rows_incremental(r: dict) -> list[tuple[str, str, str]]:
    rows = []
    for name, what in (("added", f"+{r['new_urls']:,} URLs in a new list"), ("removed", "that list removed")):
        ran = r["runs"][name]
        work = [
            f"{stage} {ran[stage]['items']:,} items ({ran[stage]['items_vs_full']:.1%})"
            for stage in ("fetch", "embed")
            if stage in ran and "items_vs_full" in ran[stage]
        ]
        skipped = [stage for stage in ("seed", "clip", "embed", "baseline") if stage not in ran]
        rows.append(
            (
                f"new extra data: {what}",
                "; ".join(work) or "nothing fetched or embedded",
                f"(share of the full run's items, {r['listed_urls']:,} URLs); not re-run: {', '.join(skipped)}",
            )
        )
    return rows


RENDERERS = {
    "incremental": rows_incremental,
    "method_ablation": rows_method_ablation,
    "leak_recall": rows_leak_recall,
    "train": rows_train,
    "fetch": rows_fetch,
    "curation_quality": rows_curation_quality,
    "curation_ablation": rows_curation_ablation,
    "embed": rows_embed,
    "curate_scale": rows_curate_scale,
    "gpu": rows_gpu,
}


def table(folder: Path) -> str:
    lines = ["| benchmark | value | against |", "|---|---|---|"]
    for path in sorted(folder.glob("*.json")):
        render = RENDERERS.get(path.stem)
        if render:
            lines += [f"| {a} | {b} | {c} |" for a, b, c in render(json.loads(path.read_text()))]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--small", action="store_true", help="render bench/results/small/ (CI's runs); README untouched"
    )
    args = parser.parse_args()
    if args.small:
        print(table(ROOT / "bench" / "results" / "small"))
        return
    readme = ROOT / "README.md"
    text = readme.read_text()
    block = f"{START}\n{table(ROOT / 'bench' / 'results')}\n{END}"
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    text = pattern.sub(block, text) if pattern.search(text) else text.replace(START, block)
    readme.write_text(text)
    print(block)


if __name__ == "__main__":
    main()
