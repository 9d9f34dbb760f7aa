"""What may be fetched, checked where it matters: on the URL, on every redirect hop, and on the address
actually connected to.

The address check runs inside the connection itself: the host is resolved once, every address is checked,
and the socket connects to a checked address, so a DNS answer that changes between a check and the connect
(DNS rebinding) cannot slip through. `build_opener` gives a urllib opener with only these pieces: no proxy
(it would hide the address really reached), no ftp:// or data:, file:// only when the manifest allows it,
and redirects only to http(s). img2dataset fetches with urllib, so crawl/worker.py puts this opener in its
worker processes.
"""

from __future__ import annotations

import functools
import http.client
import socket
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_address
from pathlib import Path
from urllib.parse import urljoin, urlsplit
from urllib.request import url2pathname

from dextra.pipeline.manifest import Manifest
from dextra.pipeline.params import FetchParams, parse_address_rule

MAX_URL_LENGTH = 2048
REDIRECT_SCHEMES = frozenset({"http", "https"})  # whatever a manifest allows, a server never redirects to file://


class Refused(Exception):
    """A URL, redirect or address the policy does not allow; the message says which rule."""


@dataclass(frozen=True)
class Policy:
    """What a worker may fetch and how much of it; small and picklable, it travels with the work.
    (Timeouts and opt-out directives are img2dataset's own arguments, passed to the worker beside it.)"""

    schemes: frozenset[str]
    allow: tuple[tuple[IPv4Network | IPv6Network, int | None], ...] = ()
    file_roots: tuple[str, ...] = ()  # where file:// URLs may point when the manifest does not allow file:// at large
    max_seconds: float = 30.0
    max_bytes: int = 10_000_000
    max_pixels: int = 40_000_000

    @classmethod
    def from_params(cls, fetch: FetchParams, manifest: Manifest, local_folders: Iterable[Path] = ()) -> Policy:
        """`local_folders`: the manifest's local sources, whose files may be read although file:// is not allowed."""
        roots = tuple(str(folder.resolve()) for folder in local_folders)
        schemes = set(manifest.allowed_schemes) | ({"file"} if roots else set())
        return cls(
            schemes=frozenset(schemes),
            allow=tuple(parse_address_rule(a) for a in fetch.allow_addresses),
            file_roots=() if "file" in manifest.allowed_schemes else roots,
            max_seconds=fetch.max_seconds,
            max_bytes=fetch.max_bytes,
            max_pixels=fetch.max_pixels,
        )


def url_refusal(url: str, schemes: Iterable[str], file_roots: tuple[str, ...] = ()) -> str | None:
    """Why `url` may not be fetched at all (before any address is known), or None. With `file_roots`, a file:// URL
    must name a file inside one of them once links are resolved."""
    if len(url) > MAX_URL_LENGTH:
        return f"URL is {len(url)} characters long (at most {MAX_URL_LENGTH})"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises on a malformed port)
    except ValueError as exc:
        return f"malformed URL ({exc})"
    schemes = sorted(schemes)
    if parts.scheme not in schemes:
        return f"scheme {parts.scheme or '(none)'!r} is not allowed (allowed: {', '.join(schemes)})"
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            return f"file URL names another host ({parts.netloc!r})"
        if file_roots:
            path = Path(url2pathname(parts.path)).resolve()
            if not any(path.is_relative_to(root) for root in file_roots):
                return f"file {path} is outside the local sources' folders"
    elif not parts.hostname:
        return "URL has no host"
    return None


def _address_kind(ip) -> str | None:
    """What makes an address non-public, or None for a public one."""
    embedded = getattr(ip, "ipv4_mapped", None) or getattr(ip, "sixtofour", None)
    if embedded is not None:
        return _address_kind(embedded)
    for attribute, kind in (
        ("is_unspecified", "unspecified"),
        ("is_loopback", "loopback"),
        ("is_link_local", "link-local"),
        ("is_multicast", "multicast"),
        ("is_reserved", "reserved"),
        ("is_private", "private"),
    ):
        if getattr(ip, attribute):
            return kind
    return None if ip.is_global else "non-public"


def address_refusal(address: str, port: int, policy: Policy) -> str | None:
    """Why connecting to `address`:`port` is refused, or None: non-public addresses need an allow_addresses rule."""
    ip = ip_address(address)
    kind = _address_kind(ip)
    if kind is None or any(ip in network and allowed in (None, port) for network, allowed in policy.allow):
        return None
    return f"{ip} is a {kind} address (not in fetch.allow_addresses)"


def connect(
    policy: Policy, address: tuple[str, int], timeout: float | None = None, source_address=None
) -> socket.socket:
    """socket.create_connection that connects only to addresses the policy allows, resolving the host once."""
    host, port = address
    refusals, error = [], None
    for family, kind, proto, _, sockaddr in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
        reason = address_refusal(sockaddr[0], port, policy)
        if reason:
            refusals.append(reason)
            continue
        sock = socket.socket(family, kind, proto)
        try:
            if isinstance(timeout, (int, float)):
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    if error is not None:
        raise error
    raise Refused(f"refused address: host {host}: {'; '.join(dict.fromkeys(refusals))}")


class _Guarded:
    def __init__(self, *args, policy: Policy, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = functools.partial(connect, policy)  # http.client's hook for opening the socket


class _HTTPConnection(_Guarded, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_Guarded, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, policy: Policy):
        super().__init__()
        self.policy = policy

    def http_open(self, req):
        return self.do_open(functools.partial(_HTTPConnection, policy=self.policy), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, policy: Policy):
        super().__init__()
        self.policy = policy

    def https_open(self, req):
        return self.do_open(functools.partial(_HTTPSConnection, policy=self.policy), req, context=self._context)


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Checks each Location before urllib follows it, and never reads a 3xx body (urllib reads it whole)."""

    def http_error_302(self, req, fp, code, msg, headers):
        location = headers.get("location") or headers.get("uri")
        if location:
            target = urljoin(req.full_url, location.strip())
            reason = url_refusal(target, REDIRECT_SCHEMES)
            if reason:
                fp.close()
                raise Refused(f"refused redirect: to {target[:200]} ({reason})")
        fp.close()
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def build_opener(policy: Policy) -> urllib.request.OpenerDirector:
    opener = urllib.request.OpenerDirector()
    handlers = [
        urllib.request.UnknownHandler(),
        _HTTPHandler(policy),
        _HTTPSHandler(policy),
        urllib.request.HTTPDefaultErrorHandler(),
        _RedirectHandler(),
        urllib.request.HTTPErrorProcessor(),
    ]
    if "file" in policy.schemes:
        handlers.append(urllib.request.FileHandler())
    for handler in handlers:
        opener.add_handler(handler)
    return opener
