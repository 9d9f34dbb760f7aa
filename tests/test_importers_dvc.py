"""`dvc repro` with `dataset: folder`: a small fixture folder as the seed set and a URL list served by a loopback
HTTP server started here, through `curate`."""

import io
import shutil
import subprocess
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image, ImageDraw

from tests.helpers import REPO
from tests.helpers.dvc import dvc, in_dependency_order, stages_run

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (40, 60, 220)}
SHAPES = {"red": "circle", "green": "square", "blue": "triangle"}


def picture(colour: str, rng: np.random.Generator, size: int) -> Image.Image:
    """A shape of the class colour on a light, noisy background, at a random place and scale."""
    background = rng.integers(200, 256, (size, size, 3), dtype=np.uint8)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    side = int(size * rng.uniform(0.45, 0.7))
    x, y = (int(v) for v in rng.integers(0, size - side, 2))
    box = (x, y, x + side, y + side)
    shape, fill = SHAPES[colour], COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x, y + side), (x + side, y + side), (x + side // 2, y)], fill=fill)
    return image


def jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


def make_seed_folder(folder, rng) -> int:
    """Eight images a class, two captions each, no split column: the seed stage splits them."""
    folder.mkdir()
    lines = ["filename,caption,class"]
    for colour in COLOURS:
        for i in range(8):
            name = f"{colour}/{i}.png"
            (folder / colour).mkdir(exist_ok=True)
            picture(colour, rng, 32).save(folder / name)
            lines += [f"{name},a {colour} {SHAPES[colour]},{colour}", f'{name},"{SHAPES[colour]}, {colour}",{colour}']
    (folder / "captions.csv").write_text("\n".join(lines) + "\n")
    return 8 * len(COLOURS)


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        with self.server.lock:
            self.server.requests[self.path] += 1
        body = self.server.routes.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Type", "image/jpeg" if body is not None else "text/plain")
        body = body if body is not None else b"no such image"
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def web():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.routes, httpd.requests, httpd.lock = {}, Counter(), threading.Lock()
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def make_url_list(path, web, rng) -> dict[str, str]:
    """In-domain images per class query, off-topic noise, a copy, a dead link and a corrupt file; url -> kind."""
    rows, kinds = ["url,text,query,class"], {}

    def add(name: str, body: bytes | None, colour: str, kind: str) -> None:
        url = f"{web.base}/img/{name}.jpg"
        if body is not None:
            web.routes[f"/img/{name}.jpg"] = body
        rows.append(f"{url},{colour} {SHAPES[colour]} photo,{colour} {SHAPES[colour]},{colour}")
        kinds[url] = kind

    for colour in COLOURS:
        for i in range(6):
            add(f"{colour}-{i}", jpeg(picture(colour, rng, 48)), colour, "in_domain")
    for i in range(3):
        add(f"noise-{i}", jpeg(Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))), "red", "noise")
    add("copy", web.routes["/img/green-0.jpg"], "green", "copy")
    add("dead", None, "blue", "dead")
    add("corrupt", b"\xff\xd8 this is not a jpeg", "blue", "corrupt")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n")
    return kinds


def copy_project(dest) -> None:
    """The working tree's files (tracked and new, not ignored): dvc.yaml, params, manifests, code."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for name in listed:
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    (dest / "dvc.lock").unlink(missing_ok=True)


@pytest.mark.slow
def test_dvc_repro_on_a_folder_seed_and_a_loopback_url_list_runs_through_curate(tmp_path, params_dict, web):
    rng = np.random.default_rng(0)
    project = tmp_path / "project"
    copy_project(project)
    n_seed = make_seed_folder(tmp_path / "photos", rng)
    kinds = make_url_list(project / "lists" / "web.csv", web, rng)
    manifest = {
        "name": "folder",
        "seed": {"importer": "folder", "path": str(tmp_path / "photos")},
        "sources": [{"name": "web", "path": "lists/web.csv", "format": "csv"}],
    }
    (project / "manifests" / "folder.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    params = params_dict(
        dataset="folder",
        fetch={"processes": 1, "threads": 4, "timeout_s": 5, "allow_addresses": ["127.0.0.1"]},
        clip={
            "model": "dextra-digits-tiny",
            "train_epochs": 2,
            "batch_size": 8,
            "lr": 0.001,
            "augment": False,
            "class_loss_weight": 0.0,
        },
        # Two epochs of CLIP on 19 photos cannot classify: judge by distance to the seed (the flow is under test here).
        curate={"cluster_detector": False, "class_detector": False, "distance_detector": "on"},
    )
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)

    ran = stages_run(dvc(project, "repro", "curate"))
    assert sorted(ran) == sorted(["seed", "urls", "fetch", "clip", "embed", "curate"])
    assert in_dependency_order(project, ran)

    seed = pq.read_table(project / "data" / "seed" / "train.parquet").to_pylist()
    seed += pq.read_table(project / "data" / "seed" / "test.parquet").to_pylist()
    assert len(seed) == n_seed and {r["class"] for r in seed} == set(COLOURS)
    assert Counter(r["split"] for r in seed) == {"train": 19, "test": 5}  # 20 %, stratified: every class in test
    assert {r["class"] for r in seed if r["split"] == "test"} == set(COLOURS)
    assert all(r["id"].startswith("folder-") and len(r["captions"]) == 2 for r in seed)

    decisions = pq.read_table(project / "data" / "curated" / "decisions.parquet").to_pylist()
    outcome = {d["url"]: d["outcome"] for d in decisions}
    assert sorted(outcome) == sorted(kinds)  # one decision per listed URL
    assert outcome[f"{web.base}/img/dead.jpg"] == outcome[f"{web.base}/img/corrupt.jpg"] == "fetch_error"
    assert outcome[f"{web.base}/img/copy.jpg"] == "duplicate" or outcome[f"{web.base}/img/green-0.jpg"] == "duplicate"
    kept = [url for url, o in outcome.items() if o == "kept"]
    assert kept and all(kinds[url] in ("in_domain", "copy") for url in kept)
    curated = pq.read_table(project / "data" / "curated" / "shards").to_pylist()
    assert sorted(r["url"] for r in curated) == sorted(kept)
    assert all(
        r["split"] == "extra" and r["text_embedding"] and r["neighbor_ids"][0].startswith("folder-") for r in curated
    )
    assert all(n == 1 for n in web.requests.values()) and len(web.requests) == len(kinds) + 1  # + its robots.txt
    assert "/robots.txt" in web.requests

    assert stages_run(dvc(project, "repro", "curate")) == []
