"""Safe HTTP fetching for image sources: address checks, manual redirects, retries, size caps."""

from __future__ import annotations

import email.utils
import ipaddress
import json
import socket
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter
from requests.exceptions import ChunkedEncodingError
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

RETRY_STATUSES = {429, 503}
REDIRECT_STATUSES = {301, 302, 303, 307, 308}
# errors that mean the network failed, not the server's answer: worth another try, like a 503
NETWORK_ERRORS = (requests.ConnectionError, requests.Timeout, ChunkedEncodingError)
# name the formats the image store keeps, so a CDN that negotiates formats doesn't send AVIF
IMAGE_ACCEPT = "image/webp,image/jpeg,image/png,image/gif;q=0.9,*/*;q=0.1"
NON_PUBLIC = ("loopback", "unspecified", "link_local", "multicast", "private", "reserved")
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class FetchError(Exception):
    """A fetch that failed; the message says what went wrong in plain words."""

    def __init__(self, message: str, *, retryable: bool = False, retry_after: float | None = None):
        super().__init__(message)
        self.retryable = retryable  # whether trying again later might work
        self.retry_after = retry_after  # seconds the server asked us to wait, when it said


@dataclass(frozen=True)
class FetchPolicy:
    """Limits on fetching from the internet; the defaults suit a public image API."""

    timeout: float = 20.0  # seconds per connect and per read, so a stalled server can't hang a job
    max_bytes: int = 30 * 2**20  # a bigger body is refused as soon as that is known, unread
    allow_private: bool = False  # keep loopback/private/link-local addresses out of reach (SSRF)
    # "host" or "host:port" fetched whatever they resolve to: an admin's intranet source, tests
    allowed_hosts: Collection[str] = frozenset()
    max_tries: int = 6  # attempts for 429, 503 and network errors
    backoff_start: float = 1.0  # first wait when the server gives no Retry-After; doubles after
    backoff_max: float = 30.0  # no single wait is longer, a server's Retry-After included
    max_redirects: int = 5
    user_agent: str = "tastebud/0.1 (+self-hosted image rating)"

    def __post_init__(self):
        hosts = self.allowed_hosts  # one host given as a string is one host, not its letters
        hosts = [hosts] if isinstance(hosts, str) else hosts
        object.__setattr__(self, "allowed_hosts", frozenset(h.lower() for h in hosts))


def _connect_target(url: str) -> tuple[str, int]:
    """The (host, port) that requests will connect to, or FetchError.

    The URL is read with urllib3's parser — the one requests itself connects with — and also
    with urllib.parse; any URL the two read differently is refused, as are backslashes,
    user:password@ parts, whitespace and control characters, which is where such parsers
    disagree ("http://127.0.0.1:5099\\@allowed-host/" is one host to one, another to the other).
    """
    if any(c == "\\" or c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise FetchError(f"refused: {url!r} has a backslash, space or control character")
    try:
        ours, theirs = urlsplit(url), parse_url(url)
        port = theirs.port or (443 if theirs.scheme == "https" else 80)
        split_port = ours.port or port
    except (ValueError, LocationParseError):
        raise FetchError(f"refused: {url} is not a valid URL") from None
    if (theirs.scheme or "").lower() not in ("http", "https"):
        raise FetchError(f"refused: {url} is not an http or https URL")
    if theirs.auth is not None or ours.username is not None or "@" in (ours.netloc or ""):
        raise FetchError(f"refused: {url} carries a user name or password")
    host = (theirs.host or "").strip("[]").lower()  # urllib3 keeps IPv6 brackets
    if not host:
        raise FetchError(f"refused: {url} has no host")
    if (ours.hostname or "") != host or split_port != port:
        raise FetchError(f"refused: {url} reads as two different addresses")
    return host, port


def check_url(url: str, policy: FetchPolicy) -> None:
    """Refuse a URL that is not http(s) or whose host has any address that is not public."""
    host, port = _connect_target(url)
    if not _allowed_anywhere(host, port, policy):
        checked_addresses(host, port, policy)


def _allowed_anywhere(host: str, port: int, policy: FetchPolicy) -> bool:
    host_port = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return policy.allow_private or bool({host, host_port} & policy.allowed_hosts)


def checked_addresses(host: str, port: int, policy: FetchPolicy) -> list[Address]:
    """The addresses `host` resolves to now, or FetchError if the policy forbids any of them."""
    addresses = _resolve(host, port)
    if _allowed_anywhere(host, port, policy):
        return addresses
    for address in addresses:
        kind = next((k for k in NON_PUBLIC if getattr(address, f"is_{k}")), None)
        if kind is None and not address.is_global:
            kind = "non-public"  # e.g. 100.64.0.0/10, carrier-grade NAT
        if kind:
            article = "an" if kind[0] in "aeiou" else "a"
            subject = host if host == str(address) else f"{host} resolves to {address}, which"
            raise FetchError(
                f"refused: {subject} is {article} {kind.replace('_', '-')} address "
                "(allow private addresses in settings to fetch it)"
            )
    return addresses


def _pinned(connection_class: type[HTTPConnection], policy: FetchPolicy) -> type:
    """`connection_class`, connecting only to addresses it has just checked against `policy`.

    The name is resolved once, at connect time; every address is checked and the socket is
    opened to one of those very addresses, so a DNS answer that changes between the check and
    the connection (DNS rebinding) can't reach a private address. TLS still verifies the
    certificate against the host name.
    """

    class Pinned(connection_class):
        def _new_conn(self):
            name = self._dns_host  # what urllib3 would resolve; `host` stays for TLS and Host
            failure: Exception | None = None
            try:
                for address in checked_addresses(
                    name.strip("[]").rstrip(".").lower(), self.port, policy
                ):
                    self._dns_host = str(address)
                    try:
                        return super()._new_conn()
                    except OSError as exc:  # urllib3's connect errors are OSErrors; try the next
                        failure = exc
            finally:
                self._dns_host = name
            raise failure

    return Pinned


class PinnedAdapter(HTTPAdapter):
    """A requests transport whose every connection goes to an address `policy` allows."""

    def __init__(self, policy: FetchPolicy):
        self.policy = policy
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        pools = {"http": HTTPConnectionPool, "https": HTTPSConnectionPool}
        connections = {"http": HTTPConnection, "https": HTTPSConnection}
        self.poolmanager.pool_classes_by_scheme = {
            scheme: type(
                pool.__name__,
                (pool,),
                {"ConnectionCls": _pinned(connections[scheme], self.policy)},
            )
            for scheme, pool in pools.items()
        }


def _pin(session: requests.Session, policy: FetchPolicy) -> None:
    """Make `session` connect only where `policy` allows, and not through an unchecked proxy."""
    session.trust_env = False  # a proxy from the environment would connect where we can't see
    for prefix in ("http://", "https://"):
        adapter = session.get_adapter(prefix)
        if not (isinstance(adapter, PinnedAdapter) and adapter.policy == policy):
            session.mount(prefix, PinnedAdapter(policy))


def _resolve(host: str, port: int) -> list[Address]:
    try:
        addresses = [ipaddress.ip_address(host)]  # a literal address needs no lookup
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            transient = getattr(exc, "errno", None) == socket.EAI_AGAIN
            reason = getattr(exc, "strerror", None) or exc
            raise FetchError(f"cannot resolve {host}: {reason}", retryable=transient) from exc
        addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    # ::ffff:127.0.0.1 reaches 127.0.0.1, so judge (and name) the IPv4 address inside
    return [getattr(a, "ipv4_mapped", None) or a for a in addresses]


def get_json(
    session: requests.Session,
    url: str,
    *,
    params=None,
    headers=None,
    policy: FetchPolicy,
    sleep: Callable[[float], None] = time.sleep,
) -> dict:
    """Fetch a JSON object from `url`, following redirects and retrying as the policy says."""
    headers = {"Accept": "application/json", **(headers or {})}
    return _fetch(session, url, params, headers, policy, sleep, _read_json)


def get_image_bytes(
    session: requests.Session,
    url: str,
    *,
    headers=None,
    policy: FetchPolicy,
    sleep: Callable[[float], None] = time.sleep,
) -> bytes:
    """Fetch an image's bytes from `url`; anything not served as image/* is refused."""
    headers = {"Accept": IMAGE_ACCEPT, **(headers or {})}
    return _fetch(session, url, None, headers, policy, sleep, _read_image)


def _read_json(response: requests.Response, policy: FetchPolicy) -> dict:
    try:
        value = json.loads(_read_body(response, policy))
    except ValueError as exc:
        raise FetchError(f"not JSON: {response.url} ({exc})") from exc
    if not isinstance(value, dict):
        raise FetchError(f"not a JSON object: {response.url}")
    return value


def _read_image(response: requests.Response, policy: FetchPolicy) -> bytes:
    kind = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if not kind.startswith("image/"):  # checked before the body, so a web page costs nothing
        raise FetchError(f"not an image: {response.url} is {kind or 'of no stated type'}")
    return _read_body(response, policy)


def _read_body(response: requests.Response, policy: FetchPolicy) -> bytes:
    declared = _digits(response.headers.get("Content-Length"))
    if declared is not None and declared > policy.max_bytes:
        raise FetchError(
            f"too large: {response.url} is {declared:,} bytes, "
            f"over the limit of {policy.max_bytes:,}"
        )
    body = bytearray()
    for chunk in response.iter_content(64 * 1024):
        body += chunk
        if len(body) > policy.max_bytes:  # Content-Length may be missing, or lie
            raise FetchError(f"too large: {response.url} sent more than {policy.max_bytes:,} bytes")
    return bytes(body)


def _fetch(session, url, params, headers, policy, sleep, read):
    headers = {"User-Agent": policy.user_agent, **headers}
    _pin(session, policy)
    attempt = 0
    while True:
        attempt += 1
        try:
            return _fetch_once(session, url, params, headers, policy, read)
        except FetchError as exc:
            if not exc.retryable:
                raise
            if attempt >= policy.max_tries:
                tries = "try" if attempt == 1 else "tries"
                raise FetchError(f"gave up after {attempt} {tries}: {exc}", retryable=True) from exc
            backoff = policy.backoff_start * 2 ** (attempt - 1)
            sleep(min(backoff if exc.retry_after is None else exc.retry_after, policy.backoff_max))


def _fetch_once(session, url, params, headers, policy, read):
    start = url
    for _hop in range(policy.max_redirects + 1):
        check_url(url, policy)  # every hop: a public URL may redirect to a private one
        try:
            with session.get(
                url,
                params=params,
                headers=headers,
                timeout=policy.timeout,
                stream=True,
                allow_redirects=False,
            ) as response:
                status, location = response.status_code, response.headers.get("Location")
                if status in REDIRECT_STATUSES and location:
                    target = urljoin(response.url, location)
                    if urlsplit(target)[:2] != urlsplit(response.url)[:2]:
                        # as requests does: credentials for one origin never follow to another
                        headers = {
                            k: v
                            for k, v in headers.items()
                            if k.lower() not in ("authorization", "cookie")
                        }
                    url, params = target, None
                    continue
                if status in RETRY_STATUSES:
                    wait = _retry_after(response.headers.get("Retry-After"))
                    raise FetchError(
                        f"HTTP {status} for {response.url}", retryable=True, retry_after=wait
                    )
                if status >= 300:
                    raise FetchError(f"HTTP {status} for {response.url}")
                return read(response, policy)
        except NETWORK_ERRORS as exc:
            raise FetchError(f"{_network_problem(exc, policy)} for {url}", retryable=True) from exc
        except requests.RequestException as exc:  # e.g. a body whose gzip encoding is broken
            raise FetchError(f"bad answer from {url}: {exc}") from exc
    raise FetchError(f"too many redirects (more than {policy.max_redirects}) from {start}")


def _retry_after(value: str | None) -> float | None:
    seconds = _digits(value)  # Retry-After is either a number of seconds or an HTTP date
    if seconds is not None:
        return float(seconds)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _digits(text: str | None) -> int | None:
    text = (text or "").strip()
    # ASCII digits only, and not too many: int() refuses "²" (a latin-1 header) and 5000 digits
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else None


def _network_problem(exc: Exception, policy: FetchPolicy) -> str:
    if isinstance(exc, requests.Timeout):
        return f"no answer within {policy.timeout:g} s"
    # requests wraps urllib3, which wraps the OSError that says what happened ("Connection refused")
    cause: BaseException | None = exc
    for _depth in range(8):
        if cause is None:
            break
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror[0].lower() + cause.strerror[1:]
        reason = getattr(cause, "reason", None)
        following = cause.__cause__ or cause.__context__
        cause = reason if isinstance(reason, BaseException) else following
    return "connection broken" if isinstance(exc, ChunkedEncodingError) else "network error"
