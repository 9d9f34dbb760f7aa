"""Politeness toward each web host: a limit on concurrent requests and on request rate, a pause after 429 and
503 that doubles while they go on, and robots.txt, read once per host.

img2dataset has none of these, and it runs its shards in separate worker processes (or Spark and Ray
executors), so the limits must hold across processes. No library limits urllib requests per host across
processes, so it is done here with small files in the run's work folder, locked with flock: a host's slot
files bound its concurrent requests, and its state file holds the earliest time of its next request and how
many 429/503 answers came in a row. A worker killed mid-request releases its locks with its file descriptors.
The limits hold among the workers of one machine; on a cluster each machine keeps its own. robots.txt is
parsed by the standard library's robotparser and cached as a file beside the state, so each host's robots.txt
is fetched once per run whatever the number of workers.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from urllib.parse import urlsplit
from urllib.robotparser import RobotFileParser

from dextra.pipeline.atomic import write_json
from dextra.pipeline.params import FetchParams

SLOT_POLL_S = 0.005
STATE = struct.Struct("<dq")  # a host's state file: earliest time of its next request, 429/503 answers in a row
ROBOTS_MAX_BYTES = 500_000  # RFC 9309: crawlers must read at least 500 KiB


@dataclass(frozen=True)
class Politeness:
    """fetch.polite, plus the run's folder for the shared state; small and picklable, it travels with the work."""

    folder: str
    connections_per_host: int
    requests_per_second: float
    backoff_s: float
    max_backoff_s: float
    retries: int
    robots_txt: bool
    user_agent_token: str

    @classmethod
    def from_params(cls, folder: str, fetch: FetchParams) -> Politeness:
        return cls(folder=folder, user_agent_token=fetch.user_agent_token, **fetch.polite.model_dump())


class RobotsFailure(Exception):
    """robots.txt could not be read, so the host's URLs are not fetched (RFC 9309: an unreachable robots.txt
    means complete disallow); `kind` says whether a later run may try again."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def retry_after_s(headers) -> float | None:
    """A Retry-After header in seconds (it may be a number or an HTTP date), or None."""
    value = (headers.get("Retry-After") or "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def host_of(url: str) -> str | None:
    """The host whose limits a URL counts against; None for file:// and anything without a network host."""
    parts = urlsplit(url)
    return parts.hostname if parts.scheme in ("http", "https") and parts.hostname else None


def interleaved(hosts: list[str | None]) -> list[int]:
    """Row order taking one URL per host in turn (stable within a host): img2dataset's threads work through a
    shard in order, so a list sorted by host would put every thread in one host's queue. Each turn visits the
    hosts in another (fixed pseudo-random) order, or workers on different shards would reach the same host at the
    same moment and wait for each other. One host keeps its order."""
    seen: dict[str | None, int] = {}
    keys = []
    for i, host in enumerate(hosts):
        rank = seen.get(host, 0)
        seen[host] = rank + 1
        mix = hashlib.blake2b(f"{rank}\0{host}".encode(), digest_size=8).digest()
        keys.append((rank, mix, i))
    return sorted(range(len(hosts)), key=keys.__getitem__)


class Hosts:
    """One worker's view of the shared per-host state under `politeness.folder`."""

    def __init__(self, politeness: Politeness):
        self.politeness = politeness
        self.folder = Path(politeness.folder)
        self._robots: dict[str, RobotFileParser | RobotsFailure] = {}
        self._bases: dict[str, Path] = {}
        self._strikes: dict[str, int] = {}  # what this worker last saw of each host's 429/503 run

    def _base(self, key: str) -> Path:
        base = self._bases.get(key)
        if base is None:
            digest = hashlib.sha256(key.encode()).hexdigest()
            folder = self.folder / digest[:2]
            folder.mkdir(parents=True, exist_ok=True)
            base = self._bases[key] = folder / digest[2:20]
        return base

    @contextlib.contextmanager
    def _locked(self, path: Path) -> Iterator[int]:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)  # closing releases the lock

    def _update(self, host: str, change: Callable[[dict, float], dict]) -> dict:
        """Read the host's state, apply `change` (state, now) -> new state, write it back; all under its lock."""
        with self._locked(self._base(host).with_suffix(".state")) as fd:
            raw = os.pread(fd, STATE.size, 0)
            next_s, strikes = STATE.unpack(raw) if len(raw) == STATE.size else (0.0, 0)
            state = {"next": next_s, "strikes": strikes}
            new = change(state, time.time())
            if new != state:  # one fixed-size record, overwritten in place (a truncate costs a journal write)
                os.pwrite(fd, STATE.pack(new["next"], new["strikes"]), 0)
            return new

    @contextlib.contextmanager
    def turn(self, host: str, min_interval_s: float = 0.0, spaced: bool = True) -> Iterator[None]:
        """Hold one of the host's connection slots, and start no sooner than its next allowed time; `spaced=False`
        (robots.txt, once a run) holds a slot but neither waits for nor delays the host's next request."""
        base, slots = self._base(host), self.politeness.connections_per_host
        fd = None
        while fd is None:
            for i in random.sample(range(slots), slots):
                candidate = os.open(base.with_suffix(f".slot{i}"), os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(candidate, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fd = candidate
                    break
                except BlockingIOError:
                    os.close(candidate)
            else:
                time.sleep(SLOT_POLL_S * random.uniform(0.5, 1.5))
        try:
            if not spaced:
                yield
                return
            interval, tolerance = self._spacing(min_interval_s)
            start = [0.0]

            def book(state: dict, now: float) -> dict:  # GCRA: "next" is the theoretical arrival time
                start[0] = max(now, state["next"] - tolerance)
                return {**state, "next": max(state["next"], start[0]) + interval}

            self._strikes[host] = self._update(host, book)["strikes"]
            wait = start[0] - time.time()
            if wait > 0:
                time.sleep(wait)
            yield
        finally:
            os.close(fd)

    def _spacing(self, min_interval_s: float = 0.0) -> tuple[float, float]:
        """(seconds between requests, how far ahead of that schedule a request may start). The rate is kept on
        average with bursts of up to connections_per_host requests (a generic cell rate algorithm), so that
        workers reaching a host at nearly the same moment do not wait for each other; a Crawl-delay is kept
        strictly."""
        rate = self.politeness.requests_per_second
        interval = 1.0 / rate if rate else 0.0
        if min_interval_s > interval:
            return min_interval_s, 0.0
        return interval, (self.politeness.connections_per_host - 1) * interval

    def back_off(self, host: str, retry_after_s: float | None) -> float:
        """After a 429 or 503: no request to the host before Retry-After, or backoff_s doubled per answer in a
        row, at most max_backoff_s. Returns the pause."""
        p = self.politeness
        pause = [0.0]

        def change(state: dict, now: float) -> dict:
            strikes = state["strikes"] + 1
            wait = retry_after_s if retry_after_s is not None else p.backoff_s * 2 ** (strikes - 1)
            pause[0] = min(wait, p.max_backoff_s)
            tolerance = self._spacing()[1]  # no burst may start before the pause is over
            return {"next": max(state["next"], now + pause[0] + tolerance), "strikes": strikes}

        self._strikes[host] = self._update(host, change)["strikes"]
        return pause[0]

    def answered(self, host: str) -> None:
        """A request got an answer other than 429/503: the doubling starts again from backoff_s (nothing to
        write when this worker saw none)."""
        if self._strikes.get(host):
            self._strikes[host] = self._update(host, lambda state, now: {**state, "strikes": 0})["strikes"]

    def robots(self, url: str, fetch: Callable[[str], bytes]) -> RobotFileParser:
        """The parsed robots.txt of `url`'s site, fetched with `fetch` (which raises RobotsFailure for what is
        not a 2xx or 4xx) at most once per run on this machine; raises the RobotsFailure of that fetch."""
        parts = urlsplit(url)
        site = f"{parts.scheme}://{parts.netloc.lower()}"
        cached = self._robots.get(site)
        if cached is None:
            with self._locked(self._base(site).with_suffix(".robots.lock")):
                record = self._base(site).with_suffix(".robots.json")
                if record.exists():
                    saved = json.loads(record.read_text())
                else:
                    try:
                        saved = {"body": fetch(site + "/robots.txt")[:ROBOTS_MAX_BYTES].decode("utf-8", "replace")}
                    except RobotsFailure as exc:
                        saved = {"failure": [exc.kind, str(exc)]}
                    write_json(record, saved)
            if "failure" in saved:
                cached = RobotsFailure(*saved["failure"])
            else:
                cached = RobotFileParser(site + "/robots.txt")
                cached.parse(saved["body"].splitlines())
                cached.modified()  # robotparser refuses every URL until it has a read time
            self._robots[site] = cached
        if isinstance(cached, RobotsFailure):
            raise cached
        return cached
