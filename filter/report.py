"""The `report` stage: data/report/index.html, one self-contained page (images inline) showing what curate
kept and dropped and why, so a person can check the thresholds before spending GPU days on the result."""
from __future__ import annotations

import base64
import html
import io
import json
import random

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
from PIL import Image  # noqa: E402

from dextra.pipeline.atomic import write_bytes  # noqa: E402
from dextra.pipeline.errors import InputError  # noqa: E402
from dextra.pipeline.params import Params  # noqa: E402
from dextra.pipeline.paths import Paths  # noqa: E402
from dextra.pipeline.shards import CURATED_SCHEMA, DECISION_OUTCOMES, DECISION_SCHEMA, read_table, read_tables, shard_files  # noqa: E402

THUMB = 96
STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1200px;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}
.gallery{display:flex;flex-wrap:wrap;gap:.5em}.card{width:%dpx;font-size:11px;overflow-wrap:anywhere}
.card img{width:%dpx;height:%dpx;object-fit:contain;background:#eee;image-rendering:pixelated}
.pair{display:flex;gap:.3em}.kept td{text-align:left}
""" % (THUMB, THUMB, THUMB)


def data_uri(image_bytes: bytes, size: int = THUMB) -> str:
    image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    image.thumbnail((size, size))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def histogram(values: list[float], threshold: float | None, title: str) -> str:
    """A PNG data URI of the score histogram, with the threshold drawn when the detector was on."""
    fig, ax = plt.subplots(figsize=(5, 2.6), dpi=100)
    ax.hist(values, bins=50, color="#4a7fb5")
    if threshold is not None:
        ax.axvline(threshold, color="#c0392b", linestyle="--", label=f"threshold {threshold:.3g}")
        ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def _card(image_bytes: bytes | None, lines: list[str]) -> str:
    text = "<br>".join(html.escape(line) for line in lines)
    image = f'<img src="{data_uri(image_bytes)}" title="{html.escape(" | ".join(lines))}">' if image_bytes else "<div>(no image)</div>"
    return f'<div class="card">{image}<div>{text}</div></div>'


def render(params: Params, paths: Paths) -> str:
    decisions = read_table(paths.decisions, DECISION_SCHEMA)
    summary = json.loads(paths.curate_summary.read_text())
    crawl = read_tables(shard_files(paths.crawl_shards), columns=["id", "image"])
    images = dict(zip(crawl.column("id").to_pylist(), crawl.column("image").to_pylist()))
    test = read_table(paths.seed_split("test"), columns=["id", "image"])
    test_images = dict(zip(test.column("id").to_pylist(), test.column("image").to_pylist()))
    rows = decisions.to_pylist()
    rng = random.Random(params.seed)
    n = params.report.gallery_size

    counts = {c["values"]: c["counts"] for c in pc.value_counts(decisions.column("outcome")).to_pylist()}
    parts = [f"<h1>Curation report: {html.escape(params.dataset)}</h1>", f"<p>{len(rows)} crawled URLs.</p>", "<h2>Outcomes</h2><table><tr><th>outcome</th><th>URLs</th><th>share</th></tr>"]
    for outcome in DECISION_OUTCOMES:
        count = counts.get(outcome, 0)
        parts.append(f"<tr><td>{outcome}</td><td>{count}</td><td>{count / max(1, len(rows)):.1%}</td></tr>")
    parts.append("</table>")

    parts.append("<h2>Scores</h2>")
    thresholds = summary["thresholds"]
    for key, threshold, title in (
        ("seed_similarity", thresholds.get("distance"), "mean similarity to the nearest seed train images"),
        ("cluster_similarity", thresholds.get("cluster"), "similarity of the image's cluster centre to the seed (cluster detector)"),
        ("class_confidence", params.curate.min_class_confidence, "classifier confidence (class detector)"),
        ("leak_hash_distance", summary["leak_hash_distance"], "pHash bits to the closest crop of a seed test image (leak below)"),
    ):
        values = [r[key] for r in rows if r[key] is not None]
        if values:
            parts.append(f'<img alt="{key} histogram" src="{histogram(values, threshold, title)}">')

    parts.append("<h2>Galleries</h2>")
    for outcome in sorted(counts):
        group = [r for r in rows if r["outcome"] == outcome]
        sample = rng.sample(group, min(n, len(group)))
        parts.append(f"<h3>{html.escape(outcome)} ({len(group)}; {len(sample)} shown)</h3><div class='gallery'>")
        for r in sample:
            lines = [f"query: {r['query']}", r["detail"] or ""]
            if r["seed_similarity"] is not None:
                lines.append(f"seed sim {r['seed_similarity']:.3f}, pHash to test {r['leak_hash_distance']}")
            parts.append(_card(images.get(r["url_id"]), lines))
        parts.append("</div>")

    leaks = [r for r in rows if r["outcome"] == "leak"]
    parts.append(f"<h2>Leaks of seed test images ({len(leaks)})</h2><div class='gallery'>")
    for r in leaks[:n]:
        parts.append(f"<div class='pair'>{_card(images.get(r['url_id']), ['crawled', r['url_id']])}{_card(test_images.get(r['leak_of']), ['seed test', r['leak_of']])}</div>")
    parts.append("</div>")

    curated = read_tables(shard_files(paths.curated_shards), CURATED_SCHEMA, columns=["id", "image", "query", "neighbor_captions", "neighbor_weights"]).to_pylist()
    parts.append("<h2>Extrapolated text of sample kept images</h2><table class='kept'><tr><th>image</th><th>query</th><th>nearest seed captions (weight)</th></tr>")
    for r in rng.sample(curated, min(n, len(curated))):
        neighbours = "<br>".join(f"{html.escape(c)} ({w:+.2f})" for c, w in zip(r["neighbor_captions"], r["neighbor_weights"]))
        parts.append(f"<tr><td><img src='{data_uri(r['image'], 64)}'></td><td>{html.escape(r['query'] or '')}</td><td>{neighbours}</td></tr>")
    parts.append("</table>")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>dextra curation report</title><style>{STYLE}</style></head><body>{''.join(parts)}</body></html>"


def run(params: Params, paths: Paths) -> dict:
    if not paths.decisions.exists():
        raise InputError(f"{paths.decisions}: not found (run `dextra curate` first)")
    page = render(params, paths)
    write_bytes(paths.report / "index.html", page.encode())
    return {"report": str(paths.report / "index.html"), "bytes": len(page)}
