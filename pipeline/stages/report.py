"""`dextra report`: data/report/index.html from curate's decisions, and the score histograms for `dvc plots`."""

from __future__ import annotations

import io
import json

from PIL import Image

from dextra.filter.report import ReportInputs, render
from dextra.pipeline.atomic import write_bytes
from dextra.pipeline.errors import InputError
from dextra.pipeline.params import Params
from dextra.pipeline.paths import Paths
from dextra.pipeline.shards import CURATED_SCHEMA, DECISION_SCHEMA, read_table, read_tables, shard_files
from dvclive import Live

CURATED_COLUMNS = ["id", "image", "query", "neighbor_captions", "neighbor_weights"]


def _images(table) -> dict[str, bytes]:
    return dict(zip(table.column("id").to_pylist(), table.column("image").to_pylist()))


def run(params: Params, paths: Paths) -> dict:
    if not paths.decisions.exists():
        raise InputError(f"{paths.decisions}: not found (run `dextra curate` first)")
    inputs = ReportInputs(
        dataset=params.dataset,
        decisions=read_table(paths.decisions, DECISION_SCHEMA),
        summary=json.loads(paths.curate_summary.read_text()),
        crawl_images=_images(read_tables(shard_files(paths.crawl_shards), columns=["id", "image"])),
        test_images=_images(read_table(paths.seed_split("test"), columns=["id", "image"])),
        curated=read_tables(shard_files(paths.curated_shards), CURATED_SCHEMA, columns=CURATED_COLUMNS).to_pylist(),
    )
    page, histograms = render(inputs, params.report.gallery_size, params.curate.min_class_confidence, params.seed)
    write_bytes(paths.report_page, page.encode())
    with Live(dir=str(paths.live("report")), save_dvc_exp=False, dvcyaml=None) as live:
        for name, png in histograms.items():
            live.log_image(f"{name}.png", Image.open(io.BytesIO(png)))
    return {"report": str(paths.report_page), "bytes": len(page)}
