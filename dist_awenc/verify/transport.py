"""The HTTP side of black-box verification: one suspect endpoint, read defensively.

:class:`_Transport` sends a request and reads its answer within a size limit,
a total deadline, retries with back-off and no redirects; :func:`probe` asks
``/health``. :class:`~dist_awenc.verify.endpoint.RemoteModel` builds on it
(the limits are described in :mod:`dist_awenc.verify.endpoint`).

Only the standard library (``urllib.request``) is used.
"""
from __future__ import annotations

import http.client
import ipaddress
import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Optional

from dist_awenc.errors import AwencError

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
DEFAULT_DEADLINE = 600.0  # seconds one RemoteModel (one verification) may spend on the endpoint in all
BYTES_PER_NUMBER = 32  # one number of an answer in JSON, separators included, generously
ANSWER_ALLOWANCE = 64 << 10  # bytes on top: keys, whitespace; all of /health or of an error answer
MAX_CLASSES = 1 << 16  # classes assumed for the answer cap when /health says more, or nothing
_READ_CHUNK = 64 << 10


class EndpointError(AwencError):
    """The prediction endpoint is unreachable, refuses a request, answers garbage, or the query budget is spent.

    ``status`` is the HTTP status when the server refused the request, else None.
    """

    def __init__(self, message: str, status: Optional[int] = None) -> None:
        super().__init__(message)
        self.status = status


def _one_line(text: Any, limit: int = 200) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def base_url(url: str) -> str:
    """``http://host:port[/prefix][/predict|/health]`` -> ``http://host:port[/prefix]``."""
    if not isinstance(url, str) or not url.strip():
        raise EndpointError("no endpoint URL given (expected e.g. http://127.0.0.1:8000)")
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise EndpointError(f"'{url}' is not an http(s) URL (expected e.g. http://127.0.0.1:8000)")
    path = parts.path.rstrip("/")
    for suffix in ("/predict", "/health"):
        if path.endswith(suffix):
            path = path[: -len(suffix)]
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Every redirect becomes an ``HTTPError``: the suspect's endpoint may not send the owner's queries elsewhere."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001  (stdlib signature)
        raise urllib.error.HTTPError(req.full_url, code, f"redirect to {newurl}", headers, fp)


def _opener(url: str) -> urllib.request.OpenerDirector:
    handlers: list[urllib.request.BaseHandler] = [_NoRedirect()]
    if _is_loopback(url):  # a loopback server is never reached through an http_proxy from the environment
        handlers.append(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener(*handlers)


class _Deadline:
    """A total time allowance in seconds, counted from the first call to :meth:`left`."""

    def __init__(self, seconds: float) -> None:
        self.seconds = float(seconds)
        self._end: Optional[float] = None

    def left(self) -> float:
        if self._end is None:
            self._end = time.monotonic() + self.seconds
        return self._end - time.monotonic()

    def check(self, url: str, doing: str, last: str = "") -> float:
        """Seconds left; raises :class:`EndpointError` once none are."""
        left = self.left()
        if left <= 0:
            why = f"; last failure: {last}" if last else ""
            raise EndpointError(f"{url}: the deadline of {self.seconds:g} s passed {doing}{why}")
        return left


def _read_at_most(resp: Any, limit: int, deadline: _Deadline, url: str) -> bytes:
    """Up to ``limit + 1`` bytes of an answer's body, in chunks, stopping at the deadline."""
    chunks: list[bytes] = []
    total = 0
    while total <= limit:
        deadline.check(url, "while reading its answer")
        chunk = resp.read1(min(_READ_CHUNK, limit + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def _read_answer(resp: Any, limit: int, deadline: _Deadline, url: str) -> bytes:
    """An answer's body; :class:`EndpointError` when it is (or says it is) over ``limit`` bytes."""
    declared = resp.headers.get("Content-Length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise EndpointError(f"{url} announced an answer of {int(declared)} bytes; expected at most {limit}")
    data = _read_at_most(resp, limit, deadline, url)
    if len(data) > limit:
        raise EndpointError(f"{url} answered more than {limit} bytes; expected at most {limit}")
    return data


def _read_error_body(err: urllib.error.HTTPError, deadline: _Deadline, url: str) -> bytes:
    """The first ``ANSWER_ALLOWANCE`` bytes of an error answer (enough for its message), or nothing."""
    try:
        return _read_at_most(err, ANSWER_ALLOWANCE - 1, deadline, url)
    except (OSError, http.client.HTTPException, AttributeError):
        return b""
    finally:
        err.close()


def _not_delivered(err: BaseException) -> bool:
    """Whether a transport error certainly happened before the server could see the request."""
    reason = getattr(err, "reason", err)
    return isinstance(reason, (ConnectionRefusedError, socket.gaierror))


def _server_message(data: bytes) -> str:
    try:
        obj = json.loads(data)
        if isinstance(obj, dict) and "error" in obj:
            return _one_line(obj["error"])
    except (ValueError, UnicodeDecodeError):
        pass
    return _one_line(data[:200].decode("utf-8", "replace")) or "(empty body)"


def _failure(err: BaseException) -> str:
    reason = getattr(err, "reason", err)
    return _one_line(f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__)


class _Transport:
    """One HTTP exchange with bounded retries and exponential backoff, within a total deadline.

    Retries on connection errors, timeouts and HTTP 429/5xx; never on other 4xx,
    a redirect, an oversized answer or a passed deadline.
    ``before_attempt(attempt, last_failure)`` runs before each attempt and may
    raise to stop; ``after_attempt()`` runs after each attempt that may have
    reached the server (not after a refused connection or a failed DNS look-up).
    """

    def __init__(self, url: str, timeout: float, retries: int, backoff: float,
                 deadline: Optional[_Deadline] = None, headers=None, rate_limit: float = 0.0) -> None:
        self.opener = _opener(url)
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.deadline = deadline if deadline is not None else _Deadline(DEFAULT_DEADLINE)
        self.headers = headers  # a callable -> extra headers (read when a request is made; never stored or logged)
        self.min_interval = 1.0 / rate_limit if rate_limit > 0 else 0.0
        self._last_request: Optional[float] = None

    def _pace(self, url: str) -> None:
        """Wait for the rate limit: at least ``min_interval`` seconds between the starts of two requests."""
        if self._last_request is not None and self.min_interval:
            wait = self._last_request + self.min_interval - time.monotonic()
            if wait > 0:
                if wait >= self.deadline.check(url, "waiting for the rate limit"):
                    raise EndpointError(f"{url}: the deadline of {self.deadline.seconds:g} s leaves no time for the "
                                        "next request at the adapter's rate limit")
                time.sleep(wait)
        self._last_request = time.monotonic()

    def exchange(self, url: str, body: Optional[bytes] = None, *, max_bytes: int = ANSWER_ALLOWANCE,
                 before_attempt=None, after_attempt=None, content_type: str = "application/json") -> bytes:
        """The body of a 2xx answer of at most ``max_bytes`` bytes; raises :class:`EndpointError`."""
        headers = {"Accept": "application/json", **(self.headers() if self.headers is not None else {})}
        if body is not None:
            headers["Content-Type"] = content_type
        last = ""
        attempts = self.retries + 1
        for attempt in range(attempts):
            if attempt:
                pause = self.backoff * 2 ** (attempt - 1)
                if pause >= self.deadline.check(url, f"after {attempt} attempts", last):
                    raise EndpointError(f"{url}: the deadline of {self.deadline.seconds:g} s leaves no time to retry "
                                        f"after {attempt} attempts; last failure: {last}")
                time.sleep(pause)
            if before_attempt is not None:
                before_attempt(attempt, last)
            left = self.deadline.check(url, f"after {attempt} attempts" if attempt else "before the first request",
                                       last)
            self._pace(url)
            req = urllib.request.Request(url, data=body, headers=headers, method="POST" if body is not None else "GET")
            try:
                resp = self.opener.open(req, timeout=min(self.timeout, left))
            except urllib.error.HTTPError as e:
                if after_attempt is not None:
                    after_attempt()
                msg = _server_message(_read_error_body(e, self.deadline, url))
                if 300 <= e.code < 400:
                    where = _one_line(e.headers.get("Location") or "nowhere") if e.headers else "nowhere"
                    raise EndpointError(f"{url} redirected the request (HTTP {e.code}) to {where}; redirects are "
                                        "not followed: give the final URL as the endpoint", status=e.code) from None
                if e.code in RETRY_STATUS:
                    last = f"HTTP {e.code}: {msg}"
                    continue
                raise EndpointError(f"{url} refused the request (HTTP {e.code}): {msg}", status=e.code) from None
            except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets, bad status lines
                if after_attempt is not None and not _not_delivered(e):
                    after_attempt()
                last = _failure(e)
                continue
            if after_attempt is not None:
                after_attempt()
            with resp:
                try:
                    return _read_answer(resp, max_bytes, self.deadline, url)
                except (OSError, http.client.HTTPException) as e:  # dropped or timed out mid-answer
                    last = _failure(e)
        tries = f"{attempts} attempt{'s' if attempts > 1 else ''}"
        raise EndpointError(f"{url} did not answer after {tries} (timeout {self.timeout:g} s): {last}")


def probe(url: str, *, timeout: float = 10.0, retries: int = 3, backoff: float = 0.2,
          deadline: float = DEFAULT_DEADLINE) -> dict[str, Any]:
    """``GET <url>/health`` -> its JSON object (``input_size``, ``num_classes``, ``labels_only``, ...).

    Raises:
        EndpointError: unreachable after the retries or within ``deadline`` seconds, an error status,
            a redirect, an answer over 64 KiB, or not a health answer.
    """
    health = base_url(url) + "/health"
    return _probe(_Transport(health, timeout, retries, backoff, _Deadline(deadline)), health)


def _probe(transport: _Transport, health: str) -> dict[str, Any]:
    data = transport.exchange(health)
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise EndpointError(f"{health} answered with something that is not JSON: {data[:60]!r}") from None
    if not isinstance(obj, dict) or obj.get("status") != "ok":
        raise EndpointError(f"{health} is not healthy: {_one_line(json.dumps(obj))}")
    return obj
