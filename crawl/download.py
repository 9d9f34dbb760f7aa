"""Resumable download of one file (a manifest's URL list), checked against its sha256.

requests has no resume: this adds it. Bytes go to `<dest>.part`, with the server's validator (strong ETag,
else Last-Modified) in `<dest>.part.json`. A later attempt, in this run or the next, asks for the rest with
`Range` and `If-Range`: a 206 that starts where the part ends is appended; a 200 (the server ignores Range,
or the file changed since) starts the part over. Connection errors, timeouts, 5xx and 429 are retried with
exponential backoff and jitter (or the server's Retry-After). Only a file with the expected sha256 is renamed
onto `<dest>`; one with another hash is kept as `<dest>.bad` and reported with both hashes.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import requests
import urllib3
from tqdm import tqdm

from dextra.crawl.polite import retry_after_s
from dextra.pipeline.atomic import write_json
from dextra.pipeline.errors import InputError
from dextra.pipeline.shards import file_sha256

ATTEMPTS = 6
BACKOFF_S = 1.0
MAX_WAIT_S = 300.0
CHUNK = 1 << 16


class _Retry(Exception):
    def __init__(self, message: str, wait_s: float | None = None):
        super().__init__(message)
        self.wait_s = wait_s


def _validator(response: requests.Response) -> str | None:
    etag = response.headers.get("ETag")
    if etag and not etag.startswith("W/"):  # If-Range needs a strong validator
        return etag
    return response.headers.get("Last-Modified")


def _range_start(content_range: str | None) -> int | None:
    """The first byte of `Content-Range: bytes <start>-<end>/<size>`."""
    try:
        return int(content_range.split()[1].split("-")[0])
    except (AttributeError, IndexError, ValueError):
        return None


def _attempt(
    session: requests.Session, url: str, part: Path, meta: Path, label: str, timeout_s: float, chunk: int
) -> None:
    """One request: resume the part if it has a validator, else start over; returns when the part is complete."""
    offset = part.stat().st_size if part.exists() else 0
    saved = json.loads(meta.read_text()) if offset and meta.exists() else {}
    validator = saved.get("validator") if saved.get("url") == url else None
    headers = {"Accept-Encoding": "identity"}  # byte offsets must count the bytes as sent
    if offset and validator:
        headers.update({"Range": f"bytes={offset}-", "If-Range": validator})
    with session.get(url, headers=headers, stream=True, timeout=timeout_s) as response:
        code = response.status_code
        if code == 429 or code >= 500:
            raise _Retry(f"HTTP {code} {response.reason}", retry_after_s(response.headers))
        if code == 416:  # the part is not a prefix of the file as it is now
            part.unlink(missing_ok=True)
            raise _Retry("HTTP 416: the partial download does not fit the file any more; starting over", 0)
        if code not in (200, 206):
            raise InputError(f"source {label}: {url} answered HTTP {code} {response.reason}")
        if code == 206 and "Range" in headers:
            if _range_start(response.headers.get("Content-Range")) != offset:
                part.unlink(missing_ok=True)
                raise _Retry(
                    f"server sent {response.headers.get('Content-Range')!r} for bytes {offset}-; starting over", 0
                )
            mode = "ab"
        else:  # 200: Range ignored, or the file changed since the part began
            offset, mode = 0, "wb"
            write_json(meta, {"url": url, "validator": _validator(response)})
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        with (
            open(part, mode) as f,
            tqdm(total=total, initial=offset, unit="B", unit_scale=True, desc=label, mininterval=1) as bar,
        ):
            for block in response.raw.stream(chunk, decode_content=False):
                f.write(block)
                bar.update(len(block))
        if total is not None and part.stat().st_size < total:
            raise _Retry(f"connection closed after {part.stat().st_size:,} of {total:,} bytes")


def download_file(
    url: str,
    dest: Path,
    sha256: str,
    *,
    label: str,
    attempts: int = ATTEMPTS,
    backoff_s: float = BACKOFF_S,
    timeout_s: float = 60.0,
    chunk: int = CHUNK,
) -> Path:
    """`dest`, downloaded (or resumed) from `url` and checked against `sha256`; `label` names it in messages."""
    if dest.exists() and file_sha256(dest) == sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part, meta = dest.with_name(dest.name + ".part"), dest.with_name(dest.name + ".part.json")
    with requests.Session() as session:
        for attempt in range(attempts):
            if part.exists() and file_sha256(part) == sha256:  # complete, but a kill came before the rename
                break
            try:
                _attempt(session, url, part, meta, label, timeout_s, chunk)
                break
            except (_Retry, requests.ConnectionError, requests.Timeout, urllib3.exceptions.HTTPError) as exc:
                if attempt + 1 == attempts:
                    raise InputError(
                        f"source {label}: cannot download {url} after {attempts} attempts ({exc})"
                    ) from None
                wait = getattr(exc, "wait_s", None)
                if wait is None:
                    wait = backoff_s * 2**attempt * random.uniform(0.5, 1.0)
                time.sleep(min(wait, MAX_WAIT_S))
    got = file_sha256(part)
    if got != sha256:
        bad = dest.with_name(dest.name + ".bad")
        part.replace(bad)
        meta.unlink(missing_ok=True)
        raise InputError(f"source {label}: {url} has sha256 {got} but the manifest expects {sha256} (kept as {bad})")
    part.replace(dest)
    meta.unlink(missing_ok=True)
    dest.with_name(dest.name + ".bad").unlink(missing_ok=True)
    return dest
