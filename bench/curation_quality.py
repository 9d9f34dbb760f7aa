"""Score `curate` on the demo against the synthetic web's ground truth (data/seed/demo_web/truth.parquet),
next to a baseline that keeps every fetched URL, scored in the same run.

    python bench/curation_quality.py [--root .]

Rules (pipeline/demo/web.py writes the truth):
- A duplicate group is an original and its exact and near copies (truth `duplicate_of` names the original).
  A group should be kept iff its original is `in_domain`, and then exactly once: the group is one true positive
  when any copy of it is kept, and every further kept copy is a false positive. Nothing else should be kept
  (wrong_class, out_of_domain, leak, dead, corrupt, or copies of those).
  Precision = true positives / kept URLs; recall = true positives / groups that should be kept.
- Extrapolation accuracy, over kept curated rows whose image is an in-domain digit: the neighbour captions
  vote with their weights (neighbor_captions[i] belongs to neighbor_weights[i]) for the digit and the
  foreground colour they name (demo.parse_caption); the vote's winner is compared with the truth.
- Condition accuracy, over the same rows: what the generator is trained on is the extrapolated text feature itself,
  not the vote, so each row's feature is read back as the seed train caption whose embedding is nearest to it,
  and that caption's digit, foreground and background colour are compared with the truth.
- Leak recall: the share of leak URLs (near-duplicates of seed test images) not kept, whatever the reason.
- Duplicates: the groups with copies, and those kept more than once (the duplicate detectors' misses).
Writes bench/results/curation_quality.json under --root.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

from dextra.pipeline.atomic import write_json
from dextra.pipeline.demo.draw import parse_caption, parse_colors
from dextra.pipeline.demo.web import KINDS
from dextra.pipeline.errors import DextraError, InputError
from dextra.pipeline.paths import Paths
from dextra.pipeline.shards import (
    DECISION_OUTCOMES,
    DECISION_SCHEMA,
    IMAGE_SCHEMA,
    read_embeddings,
    read_table,
    read_tables,
    shard_files,
)

CURATED_COLUMNS = ["url", "neighbor_captions", "neighbor_weights", "text_embedding"]


def load(root: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, tuple[list[str], np.ndarray]]:
    """truth, decisions (url, outcome), curated rows (url, neighbour captions and weights, text feature) and the seed
    train captions with their embeddings."""
    paths = Paths(root)
    truth_path = paths.demo_web / "truth.parquet"
    if not truth_path.is_file():
        raise InputError(
            f"{truth_path}: not found; curation quality needs the demo's ground truth "
            "(dataset: demo, then `dextra seed`)"
        )
    if not paths.decisions.is_file():
        raise InputError(f"{paths.decisions}: not found; run the pipeline up to curate first (`dvc repro curate`)")
    decisions = read_table(paths.decisions, DECISION_SCHEMA, columns=["url", "outcome"]).to_pandas()
    shards = shard_files(paths.curated_shards)
    curated = (
        read_tables(shards, IMAGE_SCHEMA, columns=CURATED_COLUMNS).to_pandas()
        if shards
        else pd.DataFrame(columns=CURATED_COLUMNS)
    )
    # The truth names each image by its reference relative to urls.csv; the pipeline by the file:// URL it resolved to.
    prefix = paths.demo_web.resolve().as_uri() + "/"
    for frame in (decisions, curated):
        frame["url"] = frame["url"].str.removeprefix(prefix)
    caption_file = paths.embedding_file("seed_captions", "train")
    if not caption_file.is_file():
        raise InputError(f"{caption_file}: not found; run the pipeline up to embed first (`dvc repro embed`)")
    info, vectors = read_embeddings([caption_file])
    return pd.read_parquet(truth_path), decisions, curated, (info.column("caption").to_pylist(), vectors)


def _vote(captions, weights, field: int) -> str | None:
    totals: dict[str, float] = defaultdict(float)
    for caption, weight in zip(captions, weights):
        value = parse_caption(caption)[field]
        if value is not None:
            totals[value] += float(weight)
    return max(totals, key=totals.get) if totals else None


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _keep_scores(kept: pd.Series, root: pd.Series, wanted: pd.Series) -> dict:
    true_positives = int(root[wanted & kept].nunique())
    groups = int(root[wanted].nunique())
    return {
        "kept": int(kept.sum()),
        "true_positives": true_positives,
        "groups_to_keep": groups,
        "precision": _ratio(true_positives, int(kept.sum())),
        "recall": _ratio(true_positives, groups),
    }


def _condition_scores(rows: pd.DataFrame, seed_captions: tuple[list[str], np.ndarray]) -> dict:
    """Digit, foreground and background accuracy of the seed caption nearest to each row's text feature."""
    captions, vectors = seed_captions
    if not len(rows):
        return {"digit_accuracy": None, "fg_accuracy": None, "bg_accuracy": None, "all_accuracy": None}
    features = np.stack(rows["text_embedding"].to_numpy()).astype(np.float32)
    nearest = [captions[i] for i in (features @ vectors.T).argmax(axis=1)]
    named = pd.DataFrame(
        [(parse_caption(c)[0], *parse_colors(c)) for c in nearest], columns=["true_digit", "fg_color", "bg_color"]
    )
    right = named.to_numpy() == rows[["true_digit", "fg_color", "bg_color"]].to_numpy()
    return {
        "digit_accuracy": float(right[:, 0].mean()),
        "fg_accuracy": float(right[:, 1].mean()),
        "bg_accuracy": float(right[:, 2].mean()),
        "all_accuracy": float(right.all(axis=1).mean()),
    }


def score(
    truth: pd.DataFrame,
    decisions: pd.DataFrame,
    curated: pd.DataFrame,
    seed_captions: tuple[list[str], np.ndarray],
) -> dict:
    truth = truth.set_index("url")
    outcome = decisions.drop_duplicates("url", keep="last").set_index("url")["outcome"]
    matched = outcome.index.isin(truth.index)
    if not matched.any():
        raise InputError(
            "no URL of data/curated/decisions.parquet is in the truth file: was data/seed regenerated elsewhere?"
        )
    truth["outcome"] = outcome.reindex(truth.index).fillna("missing")
    root = truth["duplicate_of"].fillna(pd.Series(truth.index, index=truth.index))
    wanted = pd.Series(truth["kind"].reindex(root).to_numpy() == "in_domain", index=truth.index)
    kept = truth["outcome"] == "kept"
    fetched = ~truth["outcome"].isin(["fetch_error", "missing"])
    result = {"kept": _keep_scores(kept, root, wanted), "baseline_keep_fetched": _keep_scores(fetched, root, wanted)}
    ours, baseline = result["kept"]["precision"], result["baseline_keep_fetched"]["precision"]
    result["precision_vs_baseline"] = ours / baseline if ours is not None and baseline else None

    rows = curated.merge(truth[wanted].reset_index()[["url", "true_digit", "fg_color", "bg_color"]], on="url")
    digit_ok, color_ok = [], []
    for row in rows.itertuples():
        if len(row.neighbor_captions) != len(row.neighbor_weights):
            raise InputError(
                f"data/curated/shards: {row.url}: {len(row.neighbor_captions)} neighbour captions for "
                f"{len(row.neighbor_weights)} weights, expected one caption per neighbour"
            )
        digit_ok.append(_vote(row.neighbor_captions, row.neighbor_weights, 0) == row.true_digit)
        color_ok.append(_vote(row.neighbor_captions, row.neighbor_weights, 1) == row.fg_color)
    n = len(rows)
    result["extrapolation"] = {
        "images": n,
        "class_accuracy": _ratio(sum(digit_ok), n),
        "color_accuracy": _ratio(sum(color_ok), n),
        "both_accuracy": _ratio(sum(d and c for d, c in zip(digit_ok, color_ok)), n),
    }
    result["condition"] = _condition_scores(rows, seed_captions)

    leak = truth["kind"] == "leak"
    result["leak"] = {
        "leak_urls": int(leak.sum()),
        "kept": int((leak & kept).sum()),
        "flagged": int((leak & (truth["outcome"] == "leak")).sum()),
        "recall": _ratio(int((leak & ~kept).sum()), int(leak.sum())),
        "false_alarms": int((~leak & (truth["outcome"] == "leak")).sum()),
    }
    kept_per_group = root[kept].value_counts()
    result["duplicates"] = {
        "groups": int((truth["kind"].isin(["duplicate_exact", "duplicate_near"])).groupby(root).any().sum()),
        "groups_kept_more_than_once": int((kept_per_group > 1).sum()),
        "extra_copies_kept": int((kept_per_group - 1).sum()),
    }
    counts = pd.crosstab(truth["kind"], truth["outcome"])
    result["per_kind"] = {
        kind: {o: int(c) for o, c in counts.loc[kind].items() if c} for kind in KINDS if kind in counts.index
    }
    result["decisions_not_in_truth"] = int((~matched).sum())
    return result


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def render(result: dict) -> str:
    outcomes = [o for o in (*DECISION_OUTCOMES, "missing") if any(o in c for c in result["per_kind"].values())]
    lines = [f"{'kind':<16}" + "".join(f"{o:>12}" for o in outcomes)]
    for kind, counts in result["per_kind"].items():
        lines.append(f"{kind:<16}" + "".join(f"{counts.get(o, 0):>12}" for o in outcomes))
    ours, base = result["kept"], result["baseline_keep_fetched"]
    lines += [
        "",
        f"{'':<26}{'curate':>10}{'keep-fetched':>14}",
        f"{'kept precision':<26}{_fmt(ours['precision']):>10}{_fmt(base['precision']):>14}",
        f"{'kept recall':<26}{_fmt(ours['recall']):>10}{_fmt(base['recall']):>14}",
        f"precision vs baseline: {_fmt(result['precision_vs_baseline'])}x",
        "",
    ]
    lines += [f"extrapolation {k}: {_fmt(v)}" for k, v in result["extrapolation"].items()]
    lines += [f"condition {k}: {_fmt(v)}" for k, v in result["condition"].items()]
    lines += [f"leak {k}: {_fmt(v)}" for k, v in result["leak"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=".", help="repository root holding data/ (default: .)")
    parser.add_argument(
        "--small", action="store_true", help="CI's run (the same work: it is quick); writes under bench/results/small/"
    )
    args = parser.parse_args(argv)
    root = Path(args.root)
    try:
        result = score(*load(root))
    except DextraError as exc:
        print(f"curation_quality: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(render(result))
    write_json(Paths(root).bench_result("curation_quality", args.small), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
