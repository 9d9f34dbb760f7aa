"""The curation report: one self-contained HTML page (images inline) showing what curate kept and dropped and why,
so a person can check the thresholds before spending GPU days on the result."""

from __future__ import annotations

import base64
import html
import io
import random
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
from PIL import Image  # noqa: E402

from dextra.pipeline.shards import DECISION_OUTCOMES  # noqa: E402

THUMB = 96
STYLE = (
    """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1200px;padding:0 1em;color:#222;line-height:1.35}
nav a{margin-right:1em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right;vertical-align:top}
th:first-child,td:first-child{text-align:left}td.why,th.why{text-align:left}td.why{color:#555}
.plots{display:flex;flex-wrap:wrap;gap:.5em}.plots img{max-width:100%}
"""
    f""".gallery{{display:flex;flex-wrap:wrap;gap:.6em}}.card{{width:{THUMB}px;font-size:11px;overflow-wrap:anywhere}}
.card img{{width:{THUMB}px;height:{THUMB}px;object-fit:contain;background:#eee;image-rendering:pixelated}}
"""
    """.pair{display:flex;gap:.3em;padding:.3em;border:1px solid #e3c0c0;border-radius:4px}.kept td{text-align:left}
"""
)
# What each outcome means, for the table (curate applies the drops in this order; the first one that fits is shown).
OUTCOME_MEANING = {
    "kept": "joins the extra set, with an extrapolated text embedding",
    "fetch_error": "not downloaded (dead link, timeout, not an image, too large)",
    "refused": "refused by the URL guard or opted out of AI use (X-Robots-Tag)",
    "duplicate": "exact or near copy of another crawled image that was kept",
    "leak": "near copy of a seed test image: would leak the test set into training",
    "cluster": "in a cluster of its query's images whose centre is far from the seed set (detector 1)",
    "class": "the seed classifier names another class than the query's, or is unsure (detector 2)",
    "distance": "less similar to its nearest seed images than the seed's own spread allows",
}


def data_uri(image_bytes: bytes, size: int = THUMB) -> str:
    image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    image.thumbnail((size, size))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return _png_uri(out.getvalue())


def histogram(values: list[float], threshold: float | None, title: str) -> bytes:
    """A PNG of the score histogram, with the threshold drawn when the detector was on."""
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
    return out.getvalue()


def _png_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _card(image_bytes: bytes | None, lines: list[str]) -> str:
    text = "<br>".join(html.escape(line) for line in lines)
    image = (
        f'<img src="{data_uri(image_bytes)}" title="{html.escape(" | ".join(lines))}">'
        if image_bytes
        else "<div>(no image)</div>"
    )
    return f'<div class="card">{image}<div>{text}</div></div>'


def _score_lines(row: dict) -> list[str]:
    lines = [f"query: {row['query']}"]
    if row["detail"]:
        lines.append(row["detail"])
    for key, label in (
        ("seed_similarity", "seed sim"),
        ("cluster_similarity", "cluster sim"),
        ("class_confidence", "class conf"),
    ):
        if row[key] is not None:
            lines.append(f"{label} {row[key]:.3f}")
    if row["predicted_class"] is not None:
        lines.append(f"predicted class {row['predicted_class']}")
    if row["leak_hash_distance"] is not None:
        lines.append(f"pHash bits to test {row['leak_hash_distance']}")
    return lines


@dataclass
class ReportInputs:
    """What the page shows: curate's decisions (a DECISION_SCHEMA table) and summary, the crawled and seed test
    images by id, and the curated rows (id, image, query, neighbor_captions, neighbor_weights)."""

    dataset: str
    decisions: pa.Table
    summary: dict
    crawl_images: dict[str, bytes]
    test_images: dict[str, bytes]
    curated: list[dict]


def render(
    inputs: ReportInputs, gallery_size: int, min_class_confidence: float, seed: int
) -> tuple[str, dict[str, bytes]]:
    """The page, and the score histograms as PNGs by name (for dvclive); galleries are seeded samples."""
    decisions, summary, images, test_images = inputs.decisions, inputs.summary, inputs.crawl_images, inputs.test_images
    rows = decisions.to_pylist()
    rng = random.Random(seed)
    n = gallery_size

    counts = {c["values"]: c["counts"] for c in pc.value_counts(decisions.column("outcome")).to_pylist()}
    parts = [
        f"<h1>Curation report: {html.escape(inputs.dataset)}</h1>",
        "<nav><a href='#outcomes'>outcomes</a><a href='#scores'>scores</a><a href='#galleries'>galleries</a>"
        "<a href='#leaks'>leaks</a><a href='#extrapolated'>extrapolated text</a></nav>",
        f"<p>{len(rows)} crawled URLs; {counts.get('kept', 0)} kept. "
        "Thumbnails show their scores below and on hover.</p>",
        f"<p id='unlisted'>{summary.get('unlisted', 0)} fetched URLs are in no list now: they are left out, and "
        "their images stay on disk for when a list names them again (<code>dextra prune</code> deletes them).</p>",
        "<h2 id='outcomes'>Outcomes</h2><table id='outcome-table'>"
        "<tr><th>outcome</th><th>URLs</th><th>share</th><th class='why'>meaning</th></tr>",
    ]
    for outcome in DECISION_OUTCOMES:
        count = counts.get(outcome, 0)
        parts.append(
            f"<tr data-outcome='{outcome}'><td>{outcome}</td><td class='count'>{count}</td>"
            f"<td>{count / max(1, len(rows)):.1%}</td>"
            f"<td class='why'>{OUTCOME_MEANING[outcome]}</td></tr>"
        )
    parts.append("</table>")

    parts.append("<h2 id='scores'>Scores</h2><div class='plots'>")
    histograms = {}
    thresholds = summary["thresholds"]
    for key, threshold, title in (
        ("seed_similarity", thresholds.get("distance"), "mean similarity to the nearest seed train images"),
        (
            "cluster_similarity",
            thresholds.get("cluster"),
            "similarity of the image's cluster centre to the seed (cluster detector)",
        ),
        ("class_confidence", min_class_confidence, "classifier confidence (class detector)"),
        (
            "leak_hash_distance",
            summary["leak_hash_distance"],
            "pHash bits to the closest crop of a seed test image (leak below)",
        ),
    ):
        values = [r[key] for r in rows if r[key] is not None]
        if values:
            histograms[key] = histogram(values, threshold, title)
            parts.append(f'<img alt="{key} histogram" src="{_png_uri(histograms[key])}">')
    parts.append("</div>")

    parts.append("<h2 id='galleries'>Galleries</h2>")
    for outcome in (o for o in DECISION_OUTCOMES if o in counts):
        group = [r for r in rows if r["outcome"] == outcome]
        sample = rng.sample(group, min(n, len(group)))
        parts.append(
            f"<h3>{html.escape(outcome)} ({len(group)}; {len(sample)} shown)</h3>"
            f"<div class='gallery' data-outcome='{outcome}'>"
        )
        parts.extend(_card(images.get(r["url_id"]), _score_lines(r)) for r in sample)
        parts.append("</div>")

    leaks = [r for r in rows if r["outcome"] == "leak"]
    parts.append(
        f"<h2 id='leaks'>Leaks of seed test images ({len(leaks)}; {min(n, len(leaks))} shown)</h2><div class='gallery'>"
    )
    for r in leaks[:n]:
        crawled = _card(images.get(r["url_id"]), ["crawled", r["url_id"], f"pHash bits {r['leak_hash_distance']}"])
        parts.append(
            f"<div class='pair' data-leak-of='{html.escape(r['leak_of'])}'>{crawled}"
            f"{_card(test_images.get(r['leak_of']), ['seed test', r['leak_of']])}</div>"
        )
    parts.append("</div>")

    curated = inputs.curated
    parts.append(
        "<h2 id='extrapolated'>Extrapolated text of sample kept images</h2>"
        "<p>Each kept image trains with a weighted mix of its nearest seed images' caption embeddings.</p>"
        "<table class='kept'><tr><th>image</th><th>query</th><th>nearest seed captions (weight)</th></tr>"
    )
    for r in rng.sample(curated, min(n, len(curated))):
        neighbours = "<br>".join(
            f"{html.escape(c)} ({w:+.2f})" for c, w in zip(r["neighbor_captions"], r["neighbor_weights"])
        )
        parts.append(
            f"<tr><td><img src='{data_uri(r['image'], 64)}'></td><td>{html.escape(r['query'] or '')}</td>"
            f"<td>{neighbours}</td></tr>"
        )
    parts.append("</table>")
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>dextra curation report</title>"
        f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>"
    )
    return page, histograms
