"""End to end through DVC on a small copy of the project: every stage runs for real, a second `dvc repro` does
nothing, and a changed param re-runs only the stages downstream of it."""

import json
import shutil

import pyarrow.parquet as pq
import pytest
import yaml

from dextra.pipeline.paths import Paths
from tests.helpers.browser import check_in_browser, have_browser
from tests.helpers.dvc import SMALL_DEMO, dvc, in_dependency_order, stages_run


@pytest.mark.slow
def test_dvc_repro_runs_every_stage_then_only_what_changed(tmp_path, small_demo, params_dict):
    shutil.copytree(small_demo.finished, tmp_path, symlinks=True, dirs_exist_ok=True)
    first = stages_run(small_demo.output)
    assert sorted(first) == sorted(
        [
            "seed", "urls", "fetch", "clip", "embed", "curate", "report", "export",
            "pretrain", "finetune", "baseline", "prior", "evaluate",
        ]
    )  # fmt: skip
    assert in_dependency_order(tmp_path, first) and first[-1] == "evaluate"
    metrics = json.loads((tmp_path / "metrics" / "eval.json").read_text())
    assert {"clip_fd", "clip_score", "gt_clip_score", "seed_only", "difference"} <= metrics.keys()
    judged = {"caption_accuracy", "digit_accuracy", "fg_accuracy", "bg_accuracy"}  # the demo's independent judge
    assert judged <= metrics.keys() and judged <= metrics["seed_only"].keys() and judged <= metrics["difference"].keys()
    assert metrics["gt_caption_accuracy"] > 0.5  # the judge reads the real test images
    decisions = pq.read_table(tmp_path / "data" / "curated" / "decisions.parquet")
    assert decisions.num_rows == 200  # one row per crawled URL
    assert (tmp_path / "data" / "report" / "index.html").stat().st_size > 1000
    assert (tmp_path / "data" / "export" / "hf" / "dataset_dict.json").exists()
    if have_browser():  # the pipeline's own report, as a person opens it
        check_in_browser(
            Paths(tmp_path), tmp_path / "browser", gallery_size=params_dict(**SMALL_DEMO)["report"]["gallery_size"]
        )
    shown = dvc(tmp_path, "metrics", "show")
    assert "clip_fd" in shown and "seed_only.clip_fd" in shown and "difference.clip_fd" in shown
    plots = dvc(tmp_path, "plots", "show", "--json")
    for plot in ("loss", "clip_fd", "samples.png", "seed_similarity.png"):
        assert plot in plots, plot

    assert stages_run(dvc(tmp_path, "repro")) == []

    changed = params_dict(**SMALL_DEMO, report={"gallery_size": 5})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
    assert stages_run(dvc(tmp_path, "repro")) == ["report"]

    # DVC's experiments, on a param that only the report reads; a curate param would make curate, and nothing
    # before it or the seed-only baseline, out of date (what follows curate re-runs through its outputs).
    assert stages_run(dvc(tmp_path, "exp", "run", "-S", "report.gallery_size=3")) == ["report"]
    table = dvc(tmp_path, "exp", "show", "--md")
    assert "report.gallery_size" in table and "clip_fd" in table
    assert "clip_fd" in dvc(tmp_path, "metrics", "diff", "--all")
    tried = params_dict(
        **{**SMALL_DEMO, "curate": {**SMALL_DEMO["curate"], "k_neighbors": 2}}, report={"gallery_size": 3}
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tried, sort_keys=False))
    assert set(json.loads(dvc(tmp_path, "status", "--json"))) == {"curate"}
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump(params_dict(**SMALL_DEMO, report={"gallery_size": 3}), sort_keys=False)
    )

    # the seed-only baseline trains as long as pretrain + finetune, so both phases' steps are its params
    stages = yaml.safe_load((tmp_path / "dvc.yaml").read_text())["stages"]
    assert {"pretrain.steps", "finetune.steps"} <= set(stages["baseline"]["params"])

    # New extra data: a URL list added to the manifest re-runs what reads the crawl, never the seed set, the CLIP or
    # the seed-only baseline.
    web = tmp_path / "data" / "seed" / "demo_web"
    rows = [line.split(",") for line in (web / "urls.csv").read_text().splitlines()[1:21]]
    (tmp_path / "lists").mkdir(exist_ok=True)
    lines = ["url,text,query,class"]
    for n, (url, _, query, digit) in enumerate(rows):
        source = web / url  # the demo's URLs are relative to urls.csv
        if source.exists():
            copy = tmp_path / "lists" / f"new-{n}{source.suffix}"
            shutil.copy2(source, copy)
            lines.append(f"{copy.as_uri()},new image {n},{query},{digit}")
    (tmp_path / "lists" / "more.csv").write_text("\n".join(lines) + "\n")
    manifest = yaml.safe_load((tmp_path / "manifests" / "demo.yaml").read_text())
    manifest["sources"].append({**manifest["sources"][0], "name": "more", "path": "lists/more.csv"})
    (tmp_path / "manifests" / "demo.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    assert stages_run(dvc(tmp_path, "repro", "embed")) == ["urls", "fetch", "embed"]
    waiting = json.loads(dvc(tmp_path, "status", "--json"))
    assert {"curate", "pretrain"} <= set(waiting) and not {"seed", "clip", "baseline"} & set(waiting)
