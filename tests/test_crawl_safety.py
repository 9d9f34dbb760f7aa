"""The fetch guard (crawl/safety.py, crawl/worker.py, crawl/images.py) in this process, against a loopback server
(tests/helpers/web.py)."""

from __future__ import annotations

import io
import socket
import ssl
import subprocess
import time

import numpy as np
import pytest
import yaml
from PIL import Image

from dextra.crawl import images, safety, worker
from dextra.pipeline.errors import ParamsError
from dextra.pipeline.params import parse_params
from tests.helpers import REPO
from tests.helpers.web import CONNECTS, Web, drip, encoded, png_bomb, redirect, short, static, unsized


@pytest.fixture(scope="module")
def web():
    server = Web()
    yield server
    server.close()


# ---- URL and address rules ------------------------------------------------------------------------------


def test_url_refusal_schemes_length_and_hosts():
    web_only = ("http", "https")
    assert safety.url_refusal("http://example.org/a.jpg", web_only) is None
    for url, says in {
        "ftp://example.org/a.jpg": "scheme 'ftp'",
        "data:image/png;base64,iVBORw0KGgo=": "scheme 'data'",
        "javascript:alert(1)": "scheme 'javascript'",
        "file:///etc/passwd": "scheme 'file'",
        "example.org/a.jpg": "scheme '(none)'",
        "http:///a.jpg": "no host",
        "http://example.org:99999/a.jpg": "malformed",
        "http://example.org/" + "a" * 2048: "2048",
    }.items():
        assert says in safety.url_refusal(url, web_only), url
    assert safety.url_refusal("file:///tmp/a.png", ("file",)) is None
    assert "another host" in safety.url_refusal("file://example.org/tmp/a.png", ("file",))


@pytest.mark.parametrize(
    "address, kind",
    [
        ("127.0.0.1", "loopback"),
        ("127.0.0.2", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("192.168.0.1", "private"),
        ("172.16.5.4", "private"),
        ("fd00::1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("0.0.0.0", "unspecified"),
        ("100.64.0.1", "non-public"),
        ("2002:0a00:0001::1", "private"),
    ],
)
def test_non_public_addresses_are_refused_with_their_kind(address, kind):
    policy = safety.Policy(schemes=frozenset({"http"}))
    assert f"a {kind} address" in safety.address_refusal(address, 80, policy)


def test_allow_addresses_open_exactly_what_they_name():
    fetch = parse_params_with(allow_addresses=["127.0.0.1:8080", "10.0.0.0/8", "[::1]:9000"]).fetch
    policy = safety.Policy(
        schemes=frozenset({"http"}), allow=tuple(map(safety.parse_address_rule, fetch.allow_addresses))
    )
    assert safety.address_refusal("127.0.0.1", 8080, policy) is None
    assert safety.address_refusal("127.0.0.1", 8081, policy) is not None
    assert safety.address_refusal("10.200.3.4", 443, policy) is None
    assert safety.address_refusal("::1", 9000, policy) is None and safety.address_refusal("::1", 80, policy) is not None
    assert safety.address_refusal("93.184.216.34", 80, policy) is None  # public: always fine (no packet is sent here)
    with pytest.raises(ParamsError, match=r"fetch\.allow_addresses.*'localhost:80' is not an IP"):
        parse_params_with(allow_addresses=["localhost:80"])


def parse_params_with(**fetch):
    """The repository's params.yaml with fetch overrides."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["fetch"].update(fetch)
    return parse_params(raw)


# ---- fetching through the guard, in this process ---------------------------------------------------------

JPEG = encoded(Image.new("RGB", (40, 30), "red"), "JPEG")
NOISE_JPEG = encoded(Image.fromarray(np.random.default_rng(1).integers(0, 256, (200, 200, 3), dtype=np.uint8)), "JPEG")


def _fetch(web: Web, path_or_url: str, allow: bool = True, **limits) -> bytes:
    policy = safety.Policy(
        schemes=frozenset(limits.pop("schemes", ("http", "https"))),
        allow=(safety.parse_address_rule(web.allow),) if allow else (),
        **{"max_seconds": 5.0, "max_bytes": 100_000, **limits},
    )
    url = path_or_url if "://" in path_or_url else web.base + path_or_url
    return worker.fetch_bytes(url, policy, safety.build_opener(policy), 2.0, "img2dataset", {"noai", "noimageai"})


def _failure(web: Web, path_or_url: str, **kwargs) -> tuple[str, str]:
    with pytest.raises(worker.Failure) as caught:
        _fetch(web, path_or_url, **kwargs)
    kind, _, message = str(caught.value).partition(": ")
    return kind, message


def test_allowed_server_and_redirect_chain_are_fetched(web):
    web.routes.update(
        {
            "/red.jpg": static(JPEG),
            "/r1": redirect("/r2"),
            "/r2": redirect(f"{web.base}/r3"),
            "/r3": redirect("/red.jpg"),
        }
    )
    assert _fetch(web, "/red.jpg") == JPEG
    assert _fetch(web, "/r1") == JPEG
    user_agent = web.requests[-1][1]["User-Agent"]
    assert "img2dataset" in user_agent and "dextra" in user_agent


def test_loopback_is_refused_unless_allowed_and_nothing_connects(web):
    web.routes["/red.jpg"] = static(JPEG)
    CONNECTS.clear()
    kind, message = _failure(web, "/red.jpg", allow=False)
    assert kind == "refused" and "127.0.0.1 is a loopback address" in message
    kind, message = _failure(web, f"http://localhost:{web.port}/red.jpg", allow=False)
    assert kind == "refused" and "host localhost" in message and "loopback" in message
    assert CONNECTS == []  # refused before any socket was connected


@pytest.mark.parametrize(
    "location, says",
    [
        ("http://127.0.0.2:{port}/red.jpg", "127.0.0.2 is a loopback address"),
        ("http://127.0.0.1:{other_port}/red.jpg", "127.0.0.1 is a loopback address"),  # the allow rule names one port
        ("http://[::1]:{port}/red.jpg", "::1 is a loopback address"),
        ("http://10.1.2.3/red.jpg", "10.1.2.3 is a private address"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address"),
        ("file:///etc/passwd", "scheme 'file' is not allowed"),
        ("ftp://127.0.0.1/red.jpg", "scheme 'ftp' is not allowed"),
    ],
)
def test_every_redirect_hop_is_checked_before_connecting(web, location, says):
    web.routes.update(
        {"/red.jpg": static(JPEG), "/away": redirect(location.format(port=web.port, other_port=web.port + 1))}
    )
    CONNECTS.clear()
    kind, message = _failure(web, "/away", schemes=("http", "file"))
    assert kind == "refused" and says in message, message
    assert {address[0] for address in CONNECTS} == {"127.0.0.1"}  # only the first hop's server was reached
    assert len(CONNECTS) == 1


def test_the_address_checked_is_the_address_connected_to(web, monkeypatch):
    """DNS rebinding: a name that answers an allowed address once and a private one after gets no second lookup."""
    web.routes["/red.jpg"] = static(JPEG)
    answers = iter(["127.0.0.1", "10.9.9.9", "10.9.9.9"])
    real = socket.getaddrinfo

    def rebinding(host, port, *args, **kwargs):
        if host == "rebind.invalid":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    CONNECTS.clear()
    assert _fetch(web, f"http://rebind.invalid:{web.port}/red.jpg") == JPEG
    assert [a[0] for a in CONNECTS] == ["127.0.0.1"]
    kind, message = _failure(web, f"http://rebind.invalid:{web.port}/red.jpg")  # the next lookup says 10.9.9.9
    assert kind == "refused" and "10.9.9.9 is a private address" in message
    assert [a[0] for a in CONNECTS] == ["127.0.0.1"]


def test_status_codes_are_transient_or_permanent(web):
    web.routes.update(
        {
            "/gone": static(b"", 404),
            "/boom": static(b"", 500),
            "/busy": static(b"", 503),
            "/slow-down": static(b"", 429),
            "/loop-a": redirect("/loop-b"),
            "/loop-b": redirect("/loop-a"),
        }
    )
    assert _failure(web, "/gone") == ("permanent", "HTTP 404: Not Found")
    assert _failure(web, "/boom") == ("transient", "HTTP 500: Internal Server Error")
    assert _failure(web, "/busy")[0] == "transient" and _failure(web, "/slow-down")[0] == "transient"
    kind, message = _failure(web, "/loop-a")
    assert kind == "permanent" and message.startswith("redirect loop")


def test_opt_out_header_is_honoured(web):
    web.routes.update(
        {
            "/noai": static(JPEG, X_Robots_Tag="noai"),
            "/other-bot": static(JPEG, X_Robots_Tag="otherbot: noimageai"),
            "/ours": static(JPEG, X_Robots_Tag="img2dataset: noimageai, nofollow"),
        }
    )
    assert _failure(web, "/noai") == ("opt-out", "opt-out: X-Robots-Tag: noai")
    assert _fetch(web, "/other-bot") == JPEG  # addressed to another crawler
    assert _failure(web, "/ours")[0] == "opt-out"


def test_body_limits_hold_however_the_body_is_sent(web):
    big = b"x" * 150_000
    web.routes.update(
        {
            "/declared": static(big),
            "/undeclared": unsized(big),
            "/short": short(JPEG[:100], len(JPEG)),
            "/drip": drip(JPEG, 0.2),
        }
    )
    kind, message = _failure(web, "/declared")
    assert kind == "permanent" and "Content-Length 150,000 is over fetch.max_bytes (100,000); not read" in message
    kind, message = _failure(web, "/undeclared")
    assert kind == "permanent" and "body is over fetch.max_bytes (100,000); cut off" in message
    kind, message = _failure(web, "/short")
    assert kind == "transient" and f"ended after 100 of the {len(JPEG):,} bytes" in message
    started = time.monotonic()
    kind, message = _failure(web, "/drip", max_seconds=1.0)  # each byte comes well within the 2 s read timeout
    assert kind == "transient" and message.startswith("too slow") and time.monotonic() - started < 2.0


def test_https_goes_through_the_guard_and_verifies_certificates(tmp_path):
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            str(tmp_path / "key.pem"),
            "-out",
            str(tmp_path / "cert.pem"),
        ],
        check=True,
        capture_output=True,
    )
    secure = Web()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    secure.httpd.socket = context.wrap_socket(secure.httpd.socket, server_side=True)
    secure.routes["/red.jpg"] = static(JPEG)
    try:
        url = f"https://127.0.0.1:{secure.port}/red.jpg"
        assert _failure(secure, url, allow=False)[0] == "refused"
        kind, message = _failure(secure, url)  # allowed: it connects, and a self-signed certificate is not trusted
        assert kind == "permanent" and message.startswith("TLS error") and "CERTIFICATE_VERIFY_FAILED" in message
    finally:
        secure.close()


def test_file_urls_are_read_only_where_allowed(web, tmp_path):
    local = tmp_path / "a.jpg"
    local.write_bytes(JPEG)
    assert _fetch(web, local.as_uri(), schemes=("file",)) == JPEG
    assert _failure(web, local.as_uri())[0] == "refused"
    assert _failure(web, (tmp_path / "nope.jpg").as_uri(), schemes=("file",)) == (
        "permanent",
        f"no such file: {tmp_path / 'nope.jpg'}",
    )


# ---- image checks before decoding ----------------------------------------------------------------------


def test_image_checks_name_what_is_wrong():
    checks = {
        b"": "empty body",
        b"<!DOCTYPE html><html><body>404</body></html>": "not an image: an HTML or XML page",
        np.random.default_rng(0)
        .integers(0, 256, 3000, dtype=np.uint8)
        .tobytes(): "not an image: 3000 bytes of an unknown format",
        NOISE_JPEG[: len(NOISE_JPEG) // 2]: "truncated JPEG: no end-of-image marker",
        JPEG[:100]: "not an image: a JPEG whose header is cut short or corrupt",
        png_bomb(): (
            "decompression bomb: 400,000,000 pixels is over fetch.max_pixels (40,000,000), read from the header"
        ),
        png_bomb(7000): "decompression bomb: 49,000,000 pixels (7000x7000) is over fetch.max_pixels (40,000,000)",
    }
    for data, says in checks.items():
        with pytest.raises(images.UnusableImage, match=says.replace("(", r"\(").replace(")", r"\)")):
            images.check_image(data, 40_000_000)
    assert images.check_image(JPEG, 40_000_000) is JPEG  # ordinary images pass untouched


def test_sixteen_bit_images_keep_their_grey_level():
    grey = Image.fromarray(np.full((20, 30), 30_000, np.uint16))
    converted = Image.open(io.BytesIO(images.check_image(encoded(grey, "PNG"), 10_000)))
    assert converted.mode == "L" and converted.size == (30, 20) and converted.getpixel((0, 0)) == 30_000 >> 8
