"""Rebuild the README's benchmark table from bench/results/*.json (the numbers the benchmarks wrote).

    python bench/readme_table.py
"""
from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- bench-table -->", "<!-- /bench-table -->"


def rows_curation_quality(r: dict) -> list[tuple[str, str, str]]:
    kept, base, extra, leak = r["kept"], r["baseline_keep_fetched"], r["extrapolation"], r["leak"]
    return [
        ("curation: kept precision", f"{kept['precision']:.3f}", f"{kept['precision'] / base['precision']:.2f}× keep-everything ({base['precision']:.3f})"),
        ("curation: kept recall", f"{kept['recall']:.3f}", f"keep-everything {base['recall']:.3f}"),
        ("curation: extrapolation class / colour accuracy", f"{extra['class_accuracy']:.3f} / {extra['color_accuracy']:.3f}", f"over {extra['images']} kept in-domain images"),
        ("curation: leak recall (leaks kept)", f"{leak['recall']:.3f} ({leak['kept']})", f"of {leak['leak_urls']} seed-test near-copies"),
    ]


RENDERERS = {"curation_quality": rows_curation_quality}


def table() -> str:
    lines = ["| benchmark | value | against |", "|---|---|---|"]
    for path in sorted((ROOT / "bench" / "results").glob("*.json")):
        render = RENDERERS.get(path.stem)
        if render:
            lines += [f"| {a} | {b} | {c} |" for a, b, c in render(json.loads(path.read_text()))]
    return "\n".join(lines)


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    block = f"{START}\n{table()}\n{END}"
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    text = pattern.sub(block, text) if pattern.search(text) else text.replace(START, block)
    readme.write_text(text)
    print(block)


if __name__ == "__main__":
    main()
