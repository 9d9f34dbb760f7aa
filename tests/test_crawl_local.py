"""Local extra sources (crawl/local.py): folders and tar/zip archives of images listed by the urls stage and fetched
by the fetch stage like any URL, incrementally, with archives that try to write outside their folder refused."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from dextra.crawl.status import CRAWL_STATUS_SCHEMA
from dextra.pipeline.errors import InputError, ParamsError
from dextra.pipeline.shards import IMAGE_SCHEMA, URL_SCHEMA, read_table, shard_files
from dextra.pipeline.stages import fetch, urls
from tests.helpers.web import encoded, project, write_csv

CAPTIONS = "file,text\nsparrow/0.png,a small brown sparrow\nfinch/1.jpg,a yellow finch\n"


def _image(i: int, fmt: str = "PNG") -> bytes:
    return encoded(Image.new("RGB", (40 + i, 30), (20 * i, 100, 200)), fmt)


def _members() -> dict[str, bytes]:
    return {
        "sparrow/0.png": _image(0),
        "sparrow/2.png": _image(2),
        "finch/1.jpg": _image(1, "JPEG"),
        "loose.webp": _image(3, "WEBP"),
        "notes.txt": b"not an image",
        "captions.csv": CAPTIONS.encode(),
    }


def _tar(path: Path, members: dict[str, bytes], mode: str = "w:gz") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _garbage(path: Path) -> Path:
    path.write_bytes(b"PK\x03\x04 not really an archive")
    return path


def _listed(paths, name: str) -> dict[str, dict]:
    return {r["url"].rsplit(f"/{name}/", 1)[-1]: r for r in read_table(paths.url_list(name), URL_SCHEMA).to_pylist()}


def _statuses(paths) -> dict[str, str]:
    return {r["url_id"]: r["status"] for r in read_table(paths.crawl_status, CRAWL_STATUS_SCHEMA).to_pylist()}


def test_a_folder_source_is_listed_with_captions_and_classes_and_fetched_once(tmp_path):
    folder = tmp_path / "lists" / "birds"
    for name, data in _members().items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    (folder / ".hidden.png").write_bytes(_image(4))
    outside = tmp_path / "outside.png"
    outside.write_bytes(_image(5))
    os.symlink(outside, folder / "sparrow" / "link.png")  # leads out of the folder: never listed
    write_csv(tmp_path / "lists" / "web.csv", "url", [f"file://{outside}", "file:///etc/hostname"])
    sources = [
        {"name": "birds", "images": "lists/birds", "captions": "captions.csv", "class_from_folder": True},
        {"name": "web", "path": "lists/web.csv"},
    ]
    params, paths = project(tmp_path, sources)
    summary = urls.run(params, paths)["sources"]["birds"]
    assert summary == {"urls": 4, "captioned": 2, "links_outside": 1, "hidden": 1}
    rows = _listed(paths, "birds")
    assert sorted(rows) == ["finch/1.jpg", "loose.webp", "sparrow/0.png", "sparrow/2.png"]
    assert [rows["sparrow/0.png"][k] for k in ("text", "class", "query")] == [
        "a small brown sparrow",
        "sparrow",
        "sparrow",
    ]
    assert (rows["sparrow/2.png"]["text"], rows["loose.webp"]["class"], rows["loose.webp"]["query"]) == (
        None,
        None,
        "birds",
    )

    assert fetch.run(params, paths)["ok"] == 4
    status = _statuses(paths)
    assert {status[r["url_id"]] for r in rows.values()} == {"ok"}
    web = read_table(paths.url_list("web"), URL_SCHEMA).to_pylist()
    errors = {
        r["url_id"]: r["error"] for r in read_table(paths.crawl_status, CRAWL_STATUS_SCHEMA).to_pylist() if r["error"]
    }
    for row in web:  # file:// is allowed only inside the local sources' folders
        assert status[row["url_id"]] == "refused" and "outside the local sources' folders" in errors[row["url_id"]]
    stored = {r["url_id"]: r for p in shard_files(paths.crawl_shards) for r in read_table(p, IMAGE_SCHEMA).to_pylist()}
    assert stored[rows["finch/1.jpg"]["url_id"]]["captions"] == ["a yellow finch"]
    assert stored[rows["sparrow/2.png"]["url_id"]]["class"] == "sparrow"

    (folder / "finch" / "3.png").write_bytes(_image(6))  # new extra data: only it is fetched
    urls.run(params, paths)
    again = fetch.run(params, paths)
    assert (again["new"], again["ok"]) == (1, 1)


@pytest.mark.parametrize("archive", ["birds.tar.gz", "birds.zip"])
def test_an_archive_is_unpacked_once_and_its_ids_survive_a_new_version(tmp_path, archive):
    build = _zip if archive.endswith(".zip") else _tar
    build(tmp_path / "lists" / archive, _members())
    source = {"name": "birds", "images": f"lists/{archive}", "captions": "captions.csv", "class_from_folder": True}
    params, paths = project(tmp_path, [source])
    assert urls.run(params, paths)["sources"]["birds"]["unpacked"] == 5  # 4 images and the captions
    assert not (paths.local_sources / "birds" / "notes.txt").exists()
    first = _listed(paths, "birds")
    assert first["sparrow/0.png"]["text"] == "a small brown sparrow" and first["finch/1.jpg"]["class"] == "finch"
    assert urls.run(params, paths)["sources"]["birds"]["unpacked"] == 0  # the same archive: left as it is
    fetched = archive.endswith(".tar.gz")  # the fetch reads unpacked files alike whatever the archive was
    if fetched:
        assert fetch.run(params, paths)["ok"] == 4  # file:// inside data/local/birds/ is allowed

    build(tmp_path / "lists" / archive, {**_members(), "finch/9.png": _image(9)})
    assert urls.run(params, paths)["sources"]["birds"]["unpacked"] == 6
    second = _listed(paths, "birds")
    assert {k: v["url_id"] for k, v in first.items()} == {k: second[k]["url_id"] for k in first}
    if fetched:
        assert fetch.run(params, paths)["new"] == 1

    params, paths = project(tmp_path, [])  # the source leaves the manifest: its unpacked copy goes
    urls.run(params, paths)
    assert list(paths.local_sources.iterdir()) == []


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: _tar(p / "a.tar", {"../evil.jpg": b"x"}, "w"), "'../evil.jpg' is a path with '..'"),
        (lambda p: _tar(p / "a.tar", {"/tmp/evil.jpg": b"x"}, "w"), "'/tmp/evil.jpg' is an absolute path"),
        (lambda p: _zip(p / "a.zip", {"../evil.jpg": b"x"}), "'../evil.jpg' is a path with '..'"),
        (lambda p: _zip(p / "a.zip", {"bomb.png": bytes(20_000_000)}), "(a zip bomb)"),
        (
            lambda p: _zip(p / "a.zip", {f"{i}.png": os.urandom(1500) for i in range(3)}),
            "over the source's max_unpacked",
        ),
        (
            lambda p: _tar(p / "a.tar.gz", {f"{i}.png": os.urandom(1500) for i in range(3)}),
            "over the source's max_unpacked",
        ),
        (lambda p: _garbage(p / "a.zip"), "not a readable zip archive"),
        (lambda p: _garbage(p / "a.tgz"), "not a readable tar archive"),
    ],
)
def test_hostile_or_broken_archives_are_refused_and_nothing_is_written(tmp_path, make, message):
    (tmp_path / "lists").mkdir()
    archive = make(tmp_path / "lists")
    source = {"name": "bad", "images": f"lists/{archive.name}", "max_unpacked_bytes": 2000}
    params, paths = project(tmp_path, [source])
    with pytest.raises(InputError) as raised:
        urls.run(params, paths)
    assert str(archive) in str(raised.value) and message in str(raised.value), raised.value
    assert not (paths.local_sources / "bad").exists() and not paths.url_list("bad").exists()
    assert not (tmp_path / "evil.jpg").exists() and not Path("/tmp/evil.jpg").exists()


def test_links_in_a_tar_are_never_unpacked(tmp_path):
    archive = tmp_path / "lists" / "a.tar"
    archive.parent.mkdir()
    with tarfile.open(archive, "w") as tar:
        link = tarfile.TarInfo("escape.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        image = _image(1)
        info = tarfile.TarInfo("ok.png")
        info.size = len(image)
        tar.addfile(info, io.BytesIO(image))
    params, paths = project(tmp_path, [{"name": "links", "images": "lists/a.tar"}])
    urls.run(params, paths)
    unpacked = paths.local_sources / "links"
    assert sorted(p.name for p in unpacked.iterdir() if not p.name.startswith(".")) == ["ok.png"]
    assert list(_listed(paths, "links")) == ["ok.png"]


@pytest.mark.parametrize(
    "source, message",
    [
        ({"name": "x", "images": "/data/birds"}, "must be a path under lists/"),
        ({"name": "x", "images": "lists/../elsewhere"}, "must be a path under lists/"),
        ({"name": "x", "images": "lists/birds", "path": "lists/u.csv"}, "path"),
    ],
)
def test_local_sources_are_checked(tmp_path, source, message):
    params, paths = project(tmp_path, [source])
    with pytest.raises(ParamsError, match=message):
        urls.run(params, paths)
