"""fetch.distributor: pyspark in local mode and ray on a local cluster get the multiprocessing result, the guard
included (it runs in the Spark executors' Python workers and in the Ray workers). Needs `pip install -e ".[spark]"`
and Java 17, and `pip install -e ".[ray]"`; each is skipped without its library."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
from PIL import Image

from dextra.crawl.status import read_status
from dextra.pipeline.shards import IMAGE_SCHEMA, URL_SCHEMA, read_table, shard_files
from dextra.pipeline.stages import urls
from tests.helpers.web import Web, encoded, loopback_only_env, png_bomb, project, redirect, static, write_csv


def _crawl(root, web: Web, distributor: str, env: dict) -> dict:
    rows = [f"{web.base}/img/{i}.jpg,image {i},q,c" for i in range(12)]
    rows += [
        f"{web.base}{path},odd,q,c"
        for path in ("/missing.jpg", "/to-private", "/to-file", "/chain", "/bomb.png", "/noai.jpg")
    ]
    rows += ["file:///etc/hostname,local,q,c"]
    write_csv(root / "lists" / "web.csv", "url,text,query,class", rows)
    params, paths = project(
        root,
        [{"name": "web", "path": "lists/web.csv"}],
        web=web,
        distributor=distributor,
        processes=2,
        threads=4,
        shard_size=5,
    )
    urls.run(params, paths)
    args = [
        sys.executable,
        "-m",
        "dextra.pipeline.cli",
        "fetch",
        "--root",
        str(root),
        "--params",
        str(root / "params.yaml"),
    ]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    url_of = {r["url_id"]: r["url"] for r in read_table(paths.urls / "web.parquet", URL_SCHEMA).to_pylist()}
    sha = {
        r["id"]: r["sha256"]
        for p in shard_files(paths.crawl_shards)
        for r in read_table(p, IMAGE_SCHEMA, ["id", "sha256"]).to_pylist()
    }
    return {
        url_of[r["url_id"]]: (r["status"], r["error"], sha.get(r["url_id"])) for r in read_status(paths).to_pylist()
    }


ODD_ROUTES = {
    "/to-private": redirect("http://10.1.2.3/x.jpg"),
    "/to-file": redirect("file:///etc/passwd"),
    "/chain": redirect("/img/0.jpg"),
    "/bomb.png": static(png_bomb(), Content_Type="image/png"),
    "/noai.jpg": static(b"", X_Robots_Tag="noai"),
}


@pytest.fixture(scope="module")
def web():
    served = Web()
    served.routes.update(
        {f"/img/{i}.jpg": static(encoded(Image.new("RGB", (30 + i, 20), (20 * i, 0, 0)), "JPEG")) for i in range(12)}
    )
    served.routes.update(ODD_ROUTES)
    yield served
    served.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {**loopback_only_env(tmp_path_factory.mktemp("guard")), "SPARK_LOCAL_IP": "127.0.0.1"}


@pytest.fixture(scope="module")
def expected(web, env, tmp_path_factory):
    return _crawl(tmp_path_factory.mktemp("multiprocessing"), web, "multiprocessing", env)


def _installed(distributor: str):
    """A param that is skipped before the fixtures (the multiprocessing reference) run, where its library is missing."""
    missing = importlib.util.find_spec(distributor) is None
    return pytest.param(distributor, marks=pytest.mark.skipif(missing, reason=f"{distributor} is not installed"))


@pytest.mark.slow
@pytest.mark.parametrize("distributor", [_installed("pyspark"), _installed("ray")])
def test_a_distributor_gets_the_multiprocessing_result(distributor, web, env, expected, tmp_path):
    got = _crawl(tmp_path, web, distributor, env)
    assert got == expected
    outcomes = {url.rsplit("/", 1)[-1]: status for url, (status, _, _) in got.items()}
    assert [outcomes[k] for k in ("to-private", "to-file", "hostname", "noai.jpg", "bomb.png", "chain")] == [
        "refused",
        "refused",
        "refused",
        "opt-out",
        "error",
        "ok",
    ]
    assert sum(status == "ok" for status, _, _ in got.values()) == 13
