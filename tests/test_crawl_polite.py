"""Polite crawling (crawl/polite.py) through the real fetch stage: loopback servers on 127.0.0.1, 127.0.0.2, ...
are separate hosts; each counts the requests it gets, when they start and how many are in flight."""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from dextra.crawl import worker
from dextra.crawl.polite import Hosts, Politeness, interleaved
from dextra.crawl.safety import Policy, build_opener
from dextra.crawl.status import CRAWL_STATUS_SCHEMA
from dextra.pipeline.errors import ParamsError
from dextra.pipeline.params import FetchParams, parse_address_rule
from dextra.pipeline.shards import URL_SCHEMA, read_table
from dextra.pipeline.stages import fetch, urls
from tests.helpers.web import Web, encoded, project, send, static, write_csv

JPEG = encoded(Image.new("RGB", (40, 40), "green"), "JPEG")
ALLOW_ALL = b"User-agent: *\nDisallow:\n"


class Host:
    """A loopback web server that logs each request's path and start time and the peak of requests in flight."""

    def __init__(self, address: str, robots: bytes | None = ALLOW_ALL, serve_s: float = 0.02):
        self.web = Web(address)
        self.serve_s, self.lock = serve_s, threading.Lock()
        self.log: list[tuple[str, float, int]] = []  # path, start, HTTP code
        self.in_flight = self.peak = 0
        self.answers: dict[str, list[int]] = {}  # path -> HTTP codes to give before the image, in order
        self.retry_after: str | None = None
        if robots is not None:
            self.web.routes["/robots.txt"] = static(robots, Content_Type="text/plain")

    def image(self, path: str) -> str:
        self.web.routes[path] = self._reply
        return self.web.base + path

    def _reply(self, handler) -> None:
        path = handler.path
        with self.lock:
            queued = self.answers.get(path)
            code = queued.pop(0) if queued else 200
            self.log.append((path, time.monotonic(), code))
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        try:
            time.sleep(self.serve_s)
        finally:  # out of flight before the answer: its client may start the next request on reading it
            with self.lock:
                self.in_flight -= 1
        if code == 200:
            send(handler, 200, JPEG)
        else:
            headers = {"Content-Type": "text/plain"}
            if self.retry_after:
                headers["Retry-After"] = self.retry_after
            send(handler, code, b"slow down", headers)

    def starts(self, prefix: str = "/") -> list[float]:
        return sorted(t for path, t, _ in self.log if path.startswith(prefix))

    def pauses(self) -> list[float]:
        """Seconds from each request answered 429/503 to the host's next request."""
        log = sorted(self.log, key=lambda entry: entry[1])
        return [later[1] - entry[1] for entry, later in zip(log, log[1:]) if entry[2] in (429, 503)]

    def close(self) -> None:
        self.web.close()


@pytest.fixture
def hosts():
    made: list[Host] = []

    def make(*args, **kwargs) -> Host:
        made.append(Host(*args, **kwargs))
        return made[-1]

    yield make
    for host in made:
        host.close()


def _crawl(root, servers: list[Host], urls_listed: list[str], **fetch_params) -> dict[str, dict]:
    """urls + fetch over `urls_listed` in a fresh project; the status row of each URL."""
    write_csv(root / "lists" / "web.csv", "url,text", [f"{u},a thing" for u in urls_listed])
    params, paths = project(
        root,
        [{"name": "web", "path": "lists/web.csv"}],
        allow_addresses=[s.web.allow for s in servers],
        **{"processes": 2, "threads": 8, "shard_size": 10, **fetch_params},
    )
    urls.run(params, paths)
    fetch.run(params, paths)
    ids = {r["url_id"]: r["url"] for r in read_table(paths.urls / "web.parquet", URL_SCHEMA).to_pylist()}
    return {ids[r["url_id"]]: r for r in read_table(paths.crawl_status, CRAWL_STATUS_SCHEMA).to_pylist()}


def _fetch_directly(folder, host: Host, url: str, **polite) -> bytes | str:
    """One URL through the worker's fetch with politeness (no img2dataset run): the body, or the failure."""
    policy = Policy(schemes=frozenset({"http"}), allow=(parse_address_rule(host.web.allow),))
    token = {"user_agent_token": polite.pop("user_agent_token")} if "user_agent_token" in polite else {}
    hosts = Hosts(Politeness.from_params(str(folder), FetchParams(**token, polite=polite)))
    try:
        return worker.fetch_bytes(url, policy, build_opener(policy), 2.0, "img2dataset", set(), hosts)
    except worker.Failure as exc:
        return str(exc)


def _gaps(starts: list[float]) -> list[float]:
    starts = sorted(starts)
    return [b - a for a, b in zip(starts, starts[1:])]


def _most_in_a_second(starts: list[float]) -> int:
    return max(sum(t <= u < t + 1.0 for u in starts) for t in starts)


def test_connections_and_request_rate_hold_per_host_across_worker_processes(tmp_path, hosts):
    slow = hosts("127.0.0.1", robots=b"User-agent: *\nDisallow: /private/\n", serve_s=0.3)  # bound by connections
    fast = hosts("127.0.0.2", serve_s=0.005)  # bound by the rate
    listed = [h.image(f"/{i}.jpg") for i in range(30) for h in (slow, fast)] + [slow.image("/private/1.jpg")]
    rows = _crawl(tmp_path, [slow, fast], listed, polite={"connections_per_host": 2, "requests_per_second": 20})
    assert [r["status"] for r in rows.values()].count("ok") == 60
    private = rows[slow.web.base + "/private/1.jpg"]
    assert (private["status"], private["error"]) == ("opt-out", "robots.txt disallows this URL for img2dataset")
    assert "/private/1.jpg" not in slow.web.hits
    for host in (slow, fast):
        starts = host.starts()
        rate = (len(starts) - 1) / (starts[-1] - starts[0])
        print(f"{host.web.base}: {len(starts)} requests at {rate:.1f}/s, {_most_in_a_second(starts)} in the busiest")
        assert host.web.hits["/robots.txt"] == 1, host.web.hits  # once per host, although 2 processes fetched it
        assert host.peak <= 2, host.peak
        # 20 requests a second on average, bursts of at most 2 (connections_per_host); arrivals jitter by a few ms
        assert _most_in_a_second(starts) <= 20 + 2 and rate <= 20 * 1.1
    assert slow.peak == 2  # the 16 threads did reach the connection limit
    # the rate binds where nothing else does: 16 threads at once on a quick host
    quick = hosts("127.0.0.3", serve_s=0.002)
    quick_urls = [quick.image(f"/{i}.jpg") for i in range(40)]
    with ThreadPoolExecutor(16) as pool:
        bodies = list(
            pool.map(lambda u: _fetch_directly(tmp_path / "burst", quick, u, requests_per_second=20), quick_urls)
        )
    starts = quick.starts()
    rate = (len(starts) - 1) / (starts[-1] - starts[0])
    print(f"{quick.web.base}: {len(starts)} requests from 16 threads at {rate:.1f}/s")
    # a first burst of 4 (connections_per_host), then one every 50 ms: 39 gaps in (40 - 4) / 20 s, 21.7/s
    assert bodies == [JPEG] * 40 and 17 <= rate <= 23 and _most_in_a_second(starts) <= 20 + 4
    # the two hosts were fetched at the same time, not one after the other
    assert min(fast.starts()) < max(slow.starts()) and min(slow.starts()) < max(fast.starts())


def test_429_and_503_pause_only_their_host_doubling_and_honouring_retry_after(tmp_path, hosts):
    busy, never, limited, calm = (hosts(f"127.0.0.{i}") for i in (1, 2, 3, 4))
    busy.answers["/a.jpg"] = [503, 503]  # two in a row: pauses of 0.4 s, then 0.8 s; the third try succeeds
    never.answers["/never.jpg"] = [503] * 10
    limited.answers["/b.jpg"] = [429]
    limited.retry_after = "1"
    listed = [busy.image("/a.jpg"), never.image("/never.jpg"), limited.image("/b.jpg")]
    listed += [limited.image(f"/{i}.jpg") for i in range(4)] + [calm.image(f"/{i}.jpg") for i in range(40)]
    polite = {"connections_per_host": 1, "requests_per_second": 0, "backoff_s": 0.4, "max_backoff_s": 5, "retries": 2}
    servers = [busy, never, limited, calm]
    rows = _crawl(tmp_path, servers, listed, processes=1, threads=16, shard_size=100, polite=polite)
    assert rows[busy.web.base + "/a.jpg"]["status"] == rows[limited.web.base + "/b.jpg"]["status"] == "ok"
    failed = rows[never.web.base + "/never.jpg"]
    assert (failed["status"], failed["transient"], failed["error"]) == ("error", True, "HTTP 503: Service Unavailable")
    assert never.web.hits["/never.jpg"] == 3  # fetch.polite.retries: 2; then it waits for the next run
    for host in (busy, never):
        first, second = host.pauses()[:2]
        assert 0.4 <= first < 0.8 <= second, host.pauses()  # doubling while the 503s go on
    assert len(limited.pauses()) == 1 and limited.pauses()[0] >= 1.0, limited.pauses()  # Retry-After: 1
    print(f"pauses after 503s: {busy.pauses()}, {never.pauses()}; after a 429 with Retry-After 1: {limited.pauses()}")
    # the calm host was not paused: its requests went on while the others waited
    paused_from = busy.starts("/a.jpg")[0]
    assert sum(paused_from < t < paused_from + 0.4 for t in calm.starts()) >= 3, calm.starts()


ROBOTS = b"""User-agent: img2dataset
Disallow: /private/
Crawl-delay: 1

User-agent: *
Disallow: /
"""


def test_robots_txt_groups_and_crawl_delay_are_honoured(tmp_path, hosts):
    site = hosts("127.0.0.1", robots=ROBOTS)
    run = tmp_path / "ours"  # one run's shared folder
    assert [_fetch_directly(run, site, site.image(f"/public/{i}.jpg")) for i in range(3)] == [JPEG] * 3
    assert _fetch_directly(run, site, site.image("/private/1.jpg")) == (
        "opt-out: robots.txt disallows this URL for img2dataset"
    )
    assert site.web.hits["/robots.txt"] == 1 and "/private/1.jpg" not in site.web.hits
    assert min(_gaps(site.starts("/public/"))) >= 0.95  # Crawl-delay: 1 (robotparser reads whole seconds only)

    other = hosts("127.0.0.2", robots=ROBOTS)
    failure = _fetch_directly(tmp_path / "otherbot", other, other.image("/public/1.jpg"), user_agent_token="otherbot")
    assert failure == "opt-out: robots.txt disallows this URL for otherbot"  # the `*` group: nothing at all
    assert set(other.web.hits) == {"/robots.txt"}

    ignoring = hosts("127.0.0.3", robots=ROBOTS)
    assert _fetch_directly(tmp_path / "off", ignoring, ignoring.image("/private/1.jpg"), robots_txt=False) == JPEG
    assert ignoring.web.hits == Counter({"/private/1.jpg": 1})


def test_a_missing_robots_txt_allows_all_and_an_unreachable_one_none_until_a_later_run(tmp_path, hosts):
    missing = hosts("127.0.0.1", robots=None)  # 404
    assert _fetch_directly(tmp_path / "run1", missing, missing.image("/1.jpg")) == JPEG
    failing = hosts("127.0.0.2", robots=None)
    failing.web.routes["/robots.txt"] = static(b"down", 500, Content_Type="text/plain")
    for path in ("/1.jpg", "/2.jpg"):
        assert _fetch_directly(tmp_path / "run1", failing, failing.image(path)) == (
            "transient: robots.txt unreadable, so the site is not crawled: HTTP 500: Internal Server Error"
        )
    assert failing.web.hits == Counter({"/robots.txt": 1})  # asked once in the run
    failing.web.routes["/robots.txt"] = static(ALLOW_ALL, Content_Type="text/plain")
    assert _fetch_directly(tmp_path / "run2", failing, failing.web.base + "/1.jpg") == JPEG  # the next run asks again


def test_lists_are_interleaved_by_host_and_one_host_keeps_its_order():
    order = interleaved(["a", "a", "a", "b", "b", None])
    assert sorted(order[:3]) == [0, 3, 5] and sorted(order[3:5]) == [1, 4] and order[5] == 2  # one per host a turn
    assert [i for i in order if i in (0, 1, 2)] == [0, 1, 2] and interleaved(["a"] * 5) == [0, 1, 2, 3, 4]
    hosts = [f"h{i % 50}" for i in range(500)]
    turns = [[hosts[i] for i in interleaved(hosts)[k * 50 : (k + 1) * 50]] for k in range(10)]
    assert all(sorted(turn) == sorted(set(hosts)) for turn in turns) and len({tuple(t) for t in turns}) == 10


@pytest.mark.parametrize(
    "polite, message",
    [
        ({"backoff_s": 10, "max_backoff_s": 5}, "max_backoff_s (5) is below backoff_s (10)"),
        ({"connections_per_host": 0}, "fetch.polite.connections_per_host"),
        ({"request_per_second": 1}, "fetch.polite.request_per_second"),
    ],
)
def test_polite_params_are_checked(tmp_path, polite, message):
    with pytest.raises(ParamsError) as raised:
        project(tmp_path, [], polite=polite)
    assert "fetch.polite" in str(raised.value) and message in str(raised.value)
