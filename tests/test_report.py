"""The curation report as a person sees it: opened from disk in headless Chromium (Debian's chromium and
chromium-driver, which .ci/run installs), every image loaded, the counts equal to decisions.parquet's.

Where Chromium is not installed the browser test is skipped, except under CI (CI=true), where that is a failure.
Set DEXTRA_SCREENSHOTS=<folder> to keep the full-page screenshot."""

from __future__ import annotations

import re

import pytest

from dextra.pipeline.params import parse_params
from dextra.pipeline.shards import DECISION_OUTCOMES
from dextra.pipeline.stages import curate, report
from tests.helpers import repo_params_dict
from tests.helpers.browser import check_in_browser, decision_counts
from tests.helpers.curate import EVERY_DETECTOR, build_fixture


@pytest.fixture(scope="module")
def curated_project(tmp_path_factory):
    """curate on test_curate's fixture (every outcome, a leak among them), then report; returns (paths, params)."""
    paths, _ = build_fixture(tmp_path_factory.mktemp("report"))
    params = parse_params(repo_params_dict(curate=EVERY_DETECTOR, report={"gallery_size": 4}))
    curate.run(params, paths)
    report.run(params, paths)
    return paths, params


def test_report_is_one_self_contained_file_with_every_outcome(curated_project):
    paths, _ = curated_project
    page = (paths.report / "index.html").read_text()
    assert not re.search(r"""(src|href)=["'](?!data:|#)""", page), "everything is inline: the page opens from disk"
    shown = {
        m[0]: int(m[1]) for m in re.findall(r"<tr data-outcome='(\w+)'><td>\w+</td><td class='count'>(\d+)</td>", page)
    }
    expected = decision_counts(paths)
    assert shown == {o: expected.get(o, 0) for o in DECISION_OUTCOMES}
    assert "data-leak-of='t2'" in page  # the leak beside the seed test image it copies
    histograms = sorted(p.name for p in (paths.live("report") / "plots" / "images").iterdir())
    assert histograms == [
        "class_confidence.png",
        "cluster_similarity.png",
        "leak_copy_score.png",
        "seed_similarity.png",
    ]


def test_report_needs_curate_first(tmp_path, make_params):
    from dextra.pipeline.errors import InputError
    from dextra.pipeline.paths import Paths

    with pytest.raises(InputError, match="decisions.parquet: not found"):
        report.run(make_params(), Paths(tmp_path))


def test_report_in_headless_chromium(curated_project, tmp_path):
    paths, params = curated_project
    check_in_browser(paths, tmp_path, params.report.gallery_size)
    page = (paths.report / "index.html").read_text()
    assert page.count("class='pair'") == 1 and "data-leak-of='t2'" in page


def test_text_from_the_web_is_escaped_in_the_page(curated_project):
    """Queries, alt text and captions come from the web: the template autoescapes them."""
    import json

    import pyarrow as pa

    from dextra.filter.report import ReportInputs, render
    from dextra.pipeline.shards import DECISION_SCHEMA, read_table

    paths, _ = curated_project
    decisions = read_table(paths.decisions, DECISION_SCHEMA)
    hostile = "<script>alert('x')</script>"
    column = decisions.schema.get_field_index("query")
    decisions = decisions.set_column(column, "query", pa.array([hostile] * len(decisions), pa.string()))
    inputs = ReportInputs(
        dataset="<b>demo</b>",
        decisions=decisions,
        summary=json.loads(paths.curate_summary.read_text()),
        crawl_images={},
        test_images={},
        curated=[],
    )
    page, _ = render(inputs, 4, 0.3, 0)
    assert "<script>" not in page and "<b>demo</b>" not in page
    assert "&lt;script&gt;" in page and "(no image)" in page
