"""The guard inside img2dataset's workers.

img2dataset takes no fetch function: each worker calls `img2dataset.downloader.download_image`, which opens
any URL with plain urllib (following redirects anywhere, reading file://, whole bodies, no time limit), then
decodes whatever came back. What every distributor ships to its workers (spawned processes, Spark executors,
Ray workers) is the Downloader object. So `guarded_img2dataset` has img2dataset build a `GuardedDownloader`,
which unpickles in the worker from this module and, around each shard, swaps `download_image` for
`download_image` below (the opener of crawl/safety.py, byte and time limits, opt-out headers) and puts
crawl/images.py's checks in front of the resizer.

The outcome of each URL has to come back through img2dataset's one free-text column, error_message, so
messages start with a kind: `refused`, `opt-out`, `transient` or `permanent` (see `outcome`).
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import importlib
import io
import itertools
import multiprocessing
import os
import socket
import ssl
import threading
import time
import urllib.request
from urllib.error import HTTPError, URLError
from urllib.robotparser import RobotFileParser

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset imports albumentations, which phones home

from img2dataset import downloader as img2dataset_downloader  # noqa: E402
from img2dataset.downloader import Downloader, is_disallowed  # noqa: E402
from img2dataset.logger import LoggerProcess  # noqa: E402

from dextra.crawl.images import UnusableImage, check_image  # noqa: E402
from dextra.crawl.polite import Hosts, Politeness, RobotsFailure, host_of, retry_after_s  # noqa: E402
from dextra.crawl.safety import Policy, Refused, build_opener, url_refusal  # noqa: E402

img2dataset_main = importlib.import_module("img2dataset.main")  # the package's `main` attribute is a function

REFUSED, OPT_OUT, TRANSIENT, PERMANENT = "refused", "opt-out", "transient", "permanent"
USER_AGENT = "Mozilla/5.0 (compatible; dextra; {token}; +https://github.com/rom1504/img2dataset)"
CHUNK = 1 << 16
_watching = False  # whether die_with_parent's thread runs in this process


class Failure(Exception):
    """Why a URL gave no body; `code` and `retry_after_s` come from an HTTP answer, for the host's backoff."""

    def __init__(self, kind: str, message: str, code: int | None = None, retry_after_s: float | None = None):
        super().__init__(f"{kind}: {message}")
        self.kind, self.message, self.code, self.retry_after_s = kind, message, code, retry_after_s


def outcome(img2dataset_status: str, error_message: str | None) -> tuple[str, bool, str | None]:
    """(status, transient, error) of a status row, from img2dataset's status and error_message columns."""
    if img2dataset_status == "success":
        return "ok", False, None
    kind, _, message = (error_message or "").partition(": ")
    if kind in (REFUSED, OPT_OUT):
        return kind, False, message
    if kind in (TRANSIENT, PERMANENT):
        return "error", kind == TRANSIENT, message
    return "error", False, f"{img2dataset_status}: {error_message}"  # not from this module: img2dataset's own


def _network_failure(exc: BaseException) -> Failure:
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return Failure(TRANSIENT, "timed out: no answer within fetch.timeout_s")
    if isinstance(exc, socket.gaierror):
        kind = TRANSIENT if exc.errno == socket.EAI_AGAIN else PERMANENT
        return Failure(kind, f"unknown host: {exc.strerror}")
    if isinstance(exc, (ConnectionError, http.client.IncompleteRead, http.client.BadStatusLine)):
        return Failure(TRANSIENT, f"connection failed: {getattr(exc, 'strerror', None) or exc}")
    if isinstance(exc, ssl.SSLError):
        return Failure(PERMANENT, f"TLS error: {exc}")
    if isinstance(exc, FileNotFoundError):
        return Failure(PERMANENT, f"no such file: {exc.filename}")
    return Failure(PERMANENT, f"fetch failed: {type(exc).__name__}: {exc}")


def _read_body(response, policy: Policy, deadline: float) -> bytes:
    """The body, read in chunks so that max_bytes and max_seconds hold however the server sends it."""
    declared = response.headers.get("Content-Length", "").strip()
    declared = int(declared) if declared.isdigit() else None
    if declared is not None and declared > policy.max_bytes:
        raise Failure(
            PERMANENT,
            f"too large: Content-Length {declared:,} is over fetch.max_bytes ({policy.max_bytes:,}); not read",
        )
    # read1 returns what has arrived, so a drip cannot hold a read: a transfer ends within max_seconds plus one
    # read timeout (each read, like the connect and each redirect hop, is bounded by min(timeout_s, max_seconds))
    read = getattr(response, "read1", response.read)
    chunks, size = [], 0
    while True:
        if time.monotonic() > deadline:
            raise Failure(
                TRANSIENT,
                f"too slow: not finished after fetch.max_seconds ({policy.max_seconds:g} s), {size:,} bytes read",
            )
        chunk = read(CHUNK)
        if not chunk:
            break
        size += len(chunk)
        if size > policy.max_bytes:
            raise Failure(PERMANENT, f"too large: body is over fetch.max_bytes ({policy.max_bytes:,}); cut off")
        chunks.append(chunk)
    if declared is not None and size < declared:
        raise Failure(
            TRANSIENT, f"truncated: body ended after {size:,} of the {declared:,} bytes of its Content-Length"
        )
    return b"".join(chunks)


def _get(
    url: str,
    policy: Policy,
    opener: urllib.request.OpenerDirector,
    timeout: float,
    user_agent_token: str,
    opt_out: set[str] | None,
) -> bytes:
    """One request for `url`: its body, or a Failure saying why not and whether a later run may try again."""
    deadline = time.monotonic() + policy.max_seconds
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT.format(token=user_agent_token)})
    try:
        with opener.open(request, timeout=min(timeout, policy.max_seconds)) as response:
            if opt_out and is_disallowed(response.headers, user_agent_token, opt_out):
                raise Failure(OPT_OUT, f"opt-out: X-Robots-Tag: {'; '.join(response.headers.get_all('X-Robots-Tag'))}")
            return _read_body(response, policy, deadline)
    except Refused as exc:
        raise Failure(REFUSED, str(exc)) from None
    except HTTPError as exc:
        exc.close()
        if 300 <= exc.code < 400:
            raise Failure(
                PERMANENT, f"redirect loop: more than 10 redirects, or one URL 4 times (last HTTP {exc.code})"
            ) from None
        transient = exc.code in (408, 425, 429) or exc.code >= 500
        raise Failure(
            TRANSIENT if transient else PERMANENT,
            f"HTTP {exc.code}: {exc.reason}",
            code=exc.code,
            retry_after_s=retry_after_s(exc.headers),
        ) from None
    except URLError as exc:
        if isinstance(exc.reason, BaseException):
            raise _network_failure(exc.reason) from None
        raise Failure(PERMANENT, f"fetch failed: {exc.reason}") from None
    except (OSError, http.client.HTTPException) as exc:
        raise _network_failure(exc) from None


def _robots_rules(url: str, host: str, hosts: Hosts, policy: Policy, opener, timeout: float) -> RobotFileParser:
    """The site's robots.txt rules. RFC 9309: a 4xx means no rules; a 5xx or no answer means no URL of the site
    may be fetched, transiently (a later run asks again)."""

    def fetch(robots_url: str) -> bytes:
        with hosts.turn(host, spaced=False):
            try:
                body = _get(robots_url, policy, opener, timeout, hosts.politeness.user_agent_token, None)
            except Failure as exc:
                if exc.code is not None and 400 <= exc.code < 500 and exc.code != 429:
                    return b""
                kind = TRANSIENT if exc.kind == PERMANENT and exc.code is not None else exc.kind
                raise RobotsFailure(kind, f"robots.txt unreadable, so the site is not crawled: {exc.message}") from None
        hosts.answered(host)
        return body

    try:
        return hosts.robots(url, fetch)
    except RobotsFailure as exc:
        raise Failure(exc.kind, str(exc)) from None


def fetch_bytes(
    url: str,
    policy: Policy,
    opener: urllib.request.OpenerDirector,
    timeout: float,
    user_agent_token: str,
    opt_out: set[str] | None,
    hosts: Hosts | None = None,
) -> bytes:
    """The body of `url`, or a Failure saying why not and whether a later run may try again. With `hosts`, an
    http(s) URL waits for its host's turn, is checked against robots.txt, and a 429 or 503 pauses the host and
    is retried after the pause up to fetch.polite.retries times."""
    reason = url_refusal(url, policy.schemes, policy.file_roots)
    if reason:
        raise Failure(REFUSED, f"refused URL: {reason}")
    host = host_of(url) if hosts is not None else None
    if host is None:
        return _get(url, policy, opener, timeout, user_agent_token, opt_out)
    polite, crawl_delay = hosts.politeness, 0.0
    if polite.robots_txt:
        rules = _robots_rules(url, host, hosts, policy, opener, timeout)
        if not rules.can_fetch(polite.user_agent_token, url):
            raise Failure(OPT_OUT, f"robots.txt disallows this URL for {polite.user_agent_token}")
        crawl_delay = float(rules.crawl_delay(polite.user_agent_token) or 0.0)
    for attempt in itertools.count():
        with hosts.turn(host, crawl_delay):
            try:
                body = _get(url, policy, opener, timeout, user_agent_token, opt_out)
            except Failure as exc:
                if exc.code not in (429, 503):
                    if exc.code is not None:
                        hosts.answered(host)
                    raise
                hosts.back_off(host, exc.retry_after_s)
                if attempt == polite.retries:
                    raise
                continue
        hosts.answered(host)
        return body


def download_image(
    row, timeout, user_agent_token, disallowed_header_directives, *, policy: Policy, opener, hosts: Hosts | None
):
    """img2dataset.downloader.download_image's signature and return value, fetching through the guard."""
    key, url = row
    try:
        body = fetch_bytes(url, policy, opener, timeout, user_agent_token, disallowed_header_directives, hosts)
        return key, io.BytesIO(body), None
    except Failure as exc:
        return key, None, str(exc)


class CheckedResizer:
    """img2dataset's Resizer behind crawl/images.py's checks; its own errors become permanent failures."""

    def __init__(self, resizer, max_pixels: int):
        self.resizer = resizer
        self.max_pixels = max_pixels

    def __call__(self, img_stream, blurring_bbox_list=None):
        try:
            data = check_image(img_stream.getvalue(), self.max_pixels)
        except UnusableImage as exc:
            return None, None, None, None, None, f"{PERMANENT}: {exc}"
        *result, error = self.resizer(io.BytesIO(data), blurring_bbox_list)
        if error is not None:
            return None, None, None, None, None, f"{PERMANENT}: cannot decode or resize: {' '.join(str(error).split())}"
        return (*result, None)


def die_with_parent() -> None:
    """End this worker soon after the process that started it dies: after a `kill -9` of a run, an orphaned
    worker would go on fetching for a run that can no longer commit anything. A thread watching the parent
    pid, not prctl(PR_SET_PDEATHSIG): that signal follows the parent *thread*, and multiprocessing's pool
    starts replacement workers from a thread it ends in terminate(), killing workers that hold its queue lock."""
    global _watching
    if _watching:
        return
    _watching = True
    parent = multiprocessing.parent_process()
    parent_pid = parent.pid if parent is not None else os.getppid()

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="dextra-parent-watch", daemon=True).start()


class GuardedDownloader(Downloader):
    """img2dataset's Downloader, fetching and checking through the guard in whatever process runs the shard."""

    def __init__(self, *args, policy: Policy, politeness: Politeness | None, **kwargs):
        super().__init__(*args, **kwargs)
        self.policy, self.politeness = policy, politeness
        self.resizer = CheckedResizer(self.resizer, policy.max_pixels)

    def __call__(self, row):
        die_with_parent()
        hosts = Hosts(self.politeness) if self.politeness is not None else None
        guarded = functools.partial(download_image, policy=self.policy, opener=build_opener(self.policy), hosts=hosts)
        original, img2dataset_downloader.download_image = img2dataset_downloader.download_image, guarded
        try:
            return super().__call__(row)
        finally:
            img2dataset_downloader.download_image = original


class _LoggerProcess(LoggerProcess):
    """img2dataset's stats logger, which otherwise polls forever once its run is killed."""

    def run(self):
        die_with_parent()
        super().run()


@contextlib.contextmanager
def guarded_img2dataset(policy: Policy, politeness: Politeness | None = None):
    """Yield img2dataset.download, set up to build GuardedDownloaders (and loggers that die with the run)."""
    saved = img2dataset_main.Downloader, img2dataset_main.LoggerProcess
    img2dataset_main.Downloader = functools.partial(GuardedDownloader, policy=policy, politeness=politeness)
    img2dataset_main.LoggerProcess = _LoggerProcess
    try:
        yield img2dataset_main.download
    finally:
        img2dataset_main.Downloader, img2dataset_main.LoggerProcess = saved
