"""The curation report: one self-contained HTML page (images inline) showing what curate kept and dropped and why,
so a person can check the thresholds before spending GPU days on the result."""

from __future__ import annotations

import base64
import io
import random
from dataclasses import dataclass
from pathlib import Path

import jinja2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
from PIL import Image  # noqa: E402

from dextra.pipeline.shards import DECISION_OUTCOMES  # noqa: E402

THUMB = 96
PAGE = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=True,  # captions, alt text and queries come from the web
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
).get_template("report.html.j2")
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


def _card(image_bytes: bytes | None, lines: list[str]) -> dict:
    """A thumbnail with its text lines (the template's card macro)."""
    return {"uri": data_uri(image_bytes) if image_bytes else None, "lines": lines}


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
    if row["leak_copy_score"] is not None:
        lines.append(f"copy score to test {row['leak_copy_score']:.3f}")
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
    outcomes = [
        {
            "name": outcome,
            "count": counts.get(outcome, 0),
            "share": f"{counts.get(outcome, 0) / max(1, len(rows)):.1%}",
            "meaning": OUTCOME_MEANING[outcome],
        }
        for outcome in DECISION_OUTCOMES
    ]

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
            "leak_copy_score",
            summary["leak_copy_score"],
            "alignment R^2 to the best-aligned of the CLIP-nearest seed test images (leak above)",
        ),
    ):
        values = [r[key] for r in rows if r[key] is not None]
        if values:
            histograms[key] = histogram(values, threshold, title)

    galleries = []
    for outcome in (o for o in DECISION_OUTCOMES if o in counts):
        group = [r for r in rows if r["outcome"] == outcome]
        sample = rng.sample(group, min(n, len(group)))
        galleries.append(
            {
                "outcome": outcome,
                "total": len(group),
                "cards": [_card(images.get(r["url_id"]), _score_lines(r)) for r in sample],
            }
        )

    leaks = [r for r in rows if r["outcome"] == "leak"]
    leak_pairs = [
        {
            "leak_of": r["leak_of"],
            "crawled": _card(
                images.get(r["url_id"]), ["crawled", r["url_id"], f"copy score {r['leak_copy_score']:.3f}"]
            ),
            "test": _card(test_images.get(r["leak_of"]), ["seed test", r["leak_of"]]),
        }
        for r in leaks[:n]
    ]
    extrapolated = [
        {
            "uri": data_uri(r["image"], 64),
            "query": r["query"] or "",
            "neighbours": [f"{c} ({w:+.2f})" for c, w in zip(r["neighbor_captions"], r["neighbor_weights"])],
        }
        for r in rng.sample(inputs.curated, min(n, len(inputs.curated)))
    ]
    page = PAGE.render(
        thumb=THUMB,
        dataset=inputs.dataset,
        total=len(rows),
        kept=counts.get("kept", 0),
        unlisted=summary.get("unlisted", 0),
        outcomes=outcomes,
        plots=[(key, _png_uri(png)) for key, png in histograms.items()],
        galleries=galleries,
        leak_total=len(leaks),
        leaks=leak_pairs,
        extrapolated=extrapolated,
    )
    return page, histograms
