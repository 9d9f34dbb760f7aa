"""The curation report as a person sees it: opened from disk in headless Chromium (Debian's chromium and
chromium-driver, which .ci/run installs). Where Chromium is not installed the browser tests skip, except under CI
(CI=true), where that is a failure. Set DEXTRA_SCREENSHOTS=<folder> to keep the full-page screenshots."""

from __future__ import annotations

import collections
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from dextra.pipeline.shards import DECISION_OUTCOMES, DECISION_SCHEMA, read_table

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def decision_counts(paths) -> dict[str, int]:
    return dict(
        collections.Counter(
            read_table(paths.decisions, DECISION_SCHEMA, columns=["outcome"]).column("outcome").to_pylist()
        )
    )


def have_browser() -> bool:
    """Whether Chromium is here to test with; under CI its absence is a failure, not a reason to skip."""
    found = CHROMIUM.exists() and CHROMEDRIVER.exists()
    if not found and os.environ.get("CI") == "true":
        pytest.fail("CI must install Debian's chromium and chromium-driver (.ci/run does)")
    return found


def chromium(tmp_path: Path):
    if not have_browser():
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    # No network is reachable here: the background-networking flags keep Chromium from trying.
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1366,900",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def check_in_browser(paths, tmp_path: Path, gallery_size: int) -> Path:
    """Open paths' report in Chromium as a person would; assert every image loaded, the counts equal
    decisions.parquet's and each leak pair holds two images; returns a full-page screenshot."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    driver = chromium(tmp_path)
    try:
        driver.get((paths.report / "index.html").resolve().as_uri())
        images = driver.execute_script(
            "return Array.from(document.images)"
            ".map(i => [i.alt || i.title, i.complete, i.naturalWidth, i.getBoundingClientRect().width])"
        )
        assert len(images) >= 10
        broken = [i for i in images if not (i[1] and i[2] > 0 and i[3] > 0)]
        assert not broken, broken
        shown = driver.execute_script(
            "return Object.fromEntries(Array.from(document.querySelectorAll('#outcome-table tr[data-outcome]'))"
            ".map(r => [r.dataset.outcome, Number(r.querySelector('.count').textContent)]))"
        )
        expected = decision_counts(paths)
        assert shown == {o: expected.get(o, 0) for o in DECISION_OUTCOMES}
        pairs = driver.execute_script(
            "return Array.from(document.querySelectorAll('.pair'))"
            ".map(p => [p.dataset.leakOf, p.querySelectorAll('img').length])"
        )
        leaks = read_table(paths.decisions, DECISION_SCHEMA, columns=["outcome", "leak_of"]).to_pylist()
        assert {p[0] for p in pairs} <= {r["leak_of"] for r in leaks if r["outcome"] == "leak"} and all(
            p[1] == 2 for p in pairs
        )
        assert len(pairs) == min(expected.get("leak", 0), gallery_size)
        # Readable on a laptop: nothing wider than the window.
        assert driver.execute_script("return document.documentElement.scrollWidth") <= 1366
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1366, min(height + 100, 8000))
        shot = tmp_path / "report.png"
        driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    assert Image.open(shot).width >= 1000
    if os.environ.get("DEXTRA_SCREENSHOTS"):
        Path(os.environ["DEXTRA_SCREENSHOTS"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(os.environ["DEXTRA_SCREENSHOTS"]) / f"report-{paths.root.name}.png")
    return shot
