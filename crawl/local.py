"""Local extra sources: a folder or a tar/zip archive of images (a released extra set, a scrape done elsewhere) as
a source beside the URL lists.

Each image becomes one URL_SCHEMA row with its file:// URL, so it takes the same road as a crawled image: fetch
stores it resized and re-encoded with one status row, embed and curate judge it, and it is fetched once. Its
url_id is the hash of `<source>/<path inside the folder or archive>`, so it stays the same when the archive is
unpacked again, the checkout moves, or images are added beside it. An archive is unpacked into
data/local/<source>/ with the guards the standard library leaves to its caller: tarfile's "data" filter (no
absolute paths, no `..`, no links out, no devices), the same rules checked by hand for zip members (zipfile
would silently rewrite such names), a limit on the total unpacked size and on the free disk, and only image
files and the captions file taken out.
"""

from __future__ import annotations

import json
import shutil
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

import pandas as pd
import pyarrow as pa

from dextra.crawl.urls import url_id, url_table
from dextra.pipeline.atomic import atomic_path
from dextra.pipeline.errors import InputError
from dextra.pipeline.manifest import LocalSource

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
MAX_MEMBERS = 20_000_000
MAX_ZIP_RATIO = 200  # images barely compress; a member that unpacks to 200x its stored size is a bomb
UNPACKED = ".unpacked.json"  # in data/local/<source>/: which archive (size, mtime) it was unpacked from


def _wanted(name: str, source: LocalSource) -> bool:
    path = PurePosixPath(name)
    return path.suffix.lower() in IMAGE_SUFFIXES or (
        source.captions is not None and path == PurePosixPath(source.captions)
    )


def _unsafe_name(name: str) -> str | None:
    """Why an archive member name may not be unpacked, or None."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or (path.parts and path.parts[0].endswith(":")):
        return "an absolute path"
    if ".." in path.parts:
        return "a path with '..'"
    return None


def _check_size(archive: Path, total: int, members: int, source: LocalSource, dest: Path) -> None:
    if members > MAX_MEMBERS:
        raise InputError(f"{archive}: {members:,} members, more than {MAX_MEMBERS:,}; refused")
    if total > source.max_unpacked_bytes:
        raise InputError(
            f"{archive}: its images add up to {total:,} bytes unpacked, over the source's max_unpacked_bytes "
            f"({source.max_unpacked_bytes:,}); refused"
        )
    free = shutil.disk_usage(dest.parent).free
    if total > free:
        raise InputError(f"{archive}: unpacking needs {total:,} bytes and {dest.parent} has {free:,} free")


def _unpack_tar(archive: Path, out: Path, source: LocalSource, dest: Path) -> int:
    try:
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and _wanted(m.name, source)]
            for member in members:
                reason = _unsafe_name(member.name)
                if reason:
                    raise InputError(f"{archive}: member {member.name!r} is {reason}; nothing unpacked")
            _check_size(archive, sum(m.size for m in members), len(members), source, dest)
            tar.extractall(out, members=members, filter="data")
    except tarfile.FilterError as exc:
        raise InputError(f"{archive}: {exc}; nothing unpacked") from None
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise InputError(f"{archive}: not a readable tar archive ({exc})") from None
    return len(members)


def _unpack_zip(archive: Path, out: Path, source: LocalSource, dest: Path) -> int:
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [i for i in zf.infolist() if not i.is_dir() and _wanted(i.filename, source)]
            for info in members:
                reason = _unsafe_name(info.filename)
                if (
                    reason is None
                    and info.file_size > 1_000_000
                    and info.file_size > MAX_ZIP_RATIO * info.compress_size
                ):
                    reason = f"{info.file_size:,} bytes packed into {info.compress_size:,} (a zip bomb)"
                if reason:
                    raise InputError(f"{archive}: member {info.filename!r} is {reason}; nothing unpacked")
            _check_size(archive, sum(i.file_size for i in members), len(members), source, dest)
            for info in members:
                target = out / info.filename
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as member, open(target, "wb") as f:  # zipfile stops at the declared size
                    shutil.copyfileobj(member, f)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, RuntimeError) as exc:
        raise InputError(f"{archive}: not a readable zip archive ({exc})") from None
    return len(members)


def unpack(archive: Path, dest: Path, source: LocalSource) -> dict:
    """Unpack `archive` into `dest` unless it holds this very archive (same size and mtime) already; atomic, so a
    killed unpack leaves the previous folder. Returns {"unpacked": members, or 0 when it was already there}."""
    if not archive.is_file():
        raise InputError(f"source {source.name}: archive {archive} not found")
    stat = archive.stat()
    stamp = {"archive": archive.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    marker = dest / UNPACKED
    if marker.exists() and json.loads(marker.read_text()) == stamp:
        return {"unpacked": 0}
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as out:
        out.mkdir()
        unpack_into = _unpack_zip if archive.name.lower().endswith(".zip") else _unpack_tar
        count = unpack_into(archive, out, source, dest)
        (out / UNPACKED).write_text(json.dumps(stamp))
    return {"unpacked": count}


def _captions(folder: Path, source: LocalSource) -> dict[str, tuple[str | None, str | None]]:
    """file (inside the source) -> (text, class) from the source's captions CSV; the first row of a file wins."""
    if source.captions is None:
        return {}
    path = folder / source.captions
    if not path.is_file():
        raise InputError(f"source {source.name}: captions file {source.captions} not found in {folder}")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise InputError(f"{path}: not a readable CSV ({str(exc).splitlines()[0]})") from None
    missing = {"file", "text"} - set(frame.columns)
    if missing:
        raise InputError(f"{path}: no column(s) {', '.join(sorted(missing))} (columns: {', '.join(frame.columns)})")
    classes = frame["class"] if "class" in frame.columns else [None] * len(frame)
    found = {}
    for file, text, cls in zip(frame["file"], frame["text"], classes):
        if isinstance(file, str):
            found.setdefault(PurePosixPath(file.replace("\\", "/")).as_posix(), (_text(text), _text(cls)))
    return found


def _text(value) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def list_images(folder: Path, source: LocalSource) -> tuple[pa.Table, dict]:
    """The URL_SCHEMA rows of every image file under `folder`, in path order. Hidden files and links that lead out of
    the folder are left out, and counted."""
    if not folder.is_dir():
        raise InputError(f"source {source.name}: image folder {folder} not found")
    root = folder.resolve()
    captions = _captions(folder, source)
    rows, outside, hidden = [], 0, 0
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            hidden += path.is_file()
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        resolved = path.resolve()
        if not resolved.is_relative_to(root):
            outside += 1
            continue
        name = relative.as_posix()
        text, cls = captions.get(name, (None, None))
        if cls is None and source.class_from_folder and len(relative.parts) > 1:
            cls = relative.parts[0]
        rows.append((url_id(f"{source.name}/{name}"), resolved.as_uri(), text, cls or source.name, cls))
    table = url_table(rows, source.name)
    captioned = sum(r[2] is not None for r in rows)
    return table, {"urls": len(rows), "captioned": captioned, "links_outside": outside, "hidden": hidden}
