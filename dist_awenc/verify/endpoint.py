"""Black-box verification against a live prediction API (the client of :mod:`dist_awenc.server.app`).

:class:`RemoteModel` turns an HTTP endpoint into the ``predict_label`` /
``predict_proba`` callables that :func:`~dist_awenc.verify.core.verify_blackbox_label`
and :func:`~dist_awenc.verify.core.verify_blackbox_score` take, and keeps the
owner within a query budget: every image sent is a query, and a call that
would exceed the budget is refused before anything is sent.

The endpoint belongs to the suspect, so its answers are read defensively:

* an answer larger than it can legitimately be is refused (``EndpointError``):
  ``ANSWER_ALLOWANCE`` = 64 KiB for ``/health`` and for errors (an error body
  beyond it is cut off), and for ``/predict`` 64 KiB plus
  ``BYTES_PER_NUMBER`` = 32 bytes per image and class, classes as ``/health``
  says (at most ``MAX_CLASSES`` = 65536, also when it does not say); a larger
  ``Content-Length`` is refused before reading;
* a total ``deadline`` (``DEFAULT_DEADLINE`` = 600 s) bounds all the time one
  :class:`RemoteModel` spends on the endpoint, counted from its first request,
  across retries, back-off and reading; it is checked between reads, so it can
  be overrun by at most one ``timeout``;
* redirects are never followed: a 3xx answer is an ``EndpointError``.

Only the standard library (``urllib.request``) is used.
"""
from __future__ import annotations

import json
import math
from typing import Any, Optional

import torch

from dist_awenc.verify.adapter import LABELS_ERROR, SERVE, Adapter, label_id
from dist_awenc.verify.evidence import QueryLog, image_sha256
from dist_awenc.verify.transport import (ANSWER_ALLOWANCE, BYTES_PER_NUMBER, DEFAULT_DEADLINE, MAX_CLASSES,
                                         EndpointError, _Deadline, _probe, _Transport, base_url, probe)

__all__ = ["EndpointError", "RemoteModel", "base_url", "probe"]

_B64_BYTES_PER_FLOAT = 4 * 4 / 3


class RemoteModel:
    """A suspect model behind ``POST <url>/predict``, queried within a budget.

    Args:
        url: the server (``http://host:port``; a trailing ``/predict`` is accepted).
        query_budget: most images that may be sent in all (retries included).
        timeout: seconds per HTTP request.
        retries: further attempts after a connection error, timeout or 429/5xx.
        backoff: seconds before the first retry, doubled for each next one.
        batch_size: most images per request (also capped by the server's ``max_images``).
        deadline: seconds this model may spend on the endpoint in all (``/health`` and every
            ``/predict``, retries and back-off included), counted from its first request.

    Attributes:
        queries: images sent so far (each attempt that may have reached the server).
        answered: images with a valid answer.
        requests: HTTP requests made to ``/predict``.
    """

    def __init__(self, url: str, *, query_budget: int, timeout: float = 10.0, retries: int = 3, backoff: float = 0.2,
                 batch_size: int = 64, deadline: float = DEFAULT_DEADLINE, log: Optional[QueryLog] = None,
                 adapter: Adapter = SERVE) -> None:
        if isinstance(query_budget, bool) or not isinstance(query_budget, int) or query_budget < 0:
            raise EndpointError(f"query_budget must be a non-negative integer, got {query_budget!r}")
        if batch_size < 1 or retries < 0 or timeout <= 0 or backoff < 0 or not deadline > 0:
            raise EndpointError("need batch_size >= 1, retries >= 0, timeout > 0, backoff >= 0 and deadline > 0")
        self.url = base_url(url)
        self.adapter = adapter
        self.predict_url = self.url + adapter.predict_path
        timeout = adapter.timeout if adapter.timeout is not None else timeout
        deadline = adapter.deadline if adapter.deadline is not None else deadline
        self.query_budget = query_budget
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self.batch_size = int(batch_size)
        self.queries = 0
        self.answered = 0
        self.requests = 0
        self.deadline = _Deadline(deadline)
        self._transport = _Transport(self.url, timeout, retries, backoff, self.deadline,
                                     headers=adapter.header_values if adapter.headers else None,
                                     rate_limit=adapter.rate_limit)
        self._info: Optional[dict[str, Any]] = None
        self.log = log  # the evidence bundle's query log: every answer is logged, no logged image is asked again
        self.offline = False  # replay: answer only from the log, by query index
        self.check_images = True  # offline: whether the queries are the real images (their hashes are checked)
        self.position = 0  # index of the next query in this verification
        self.from_log = 0
        self._parsed: dict[tuple[int, bool], torch.Tensor] = {}
        self.label_names: dict[int, str] = {}  # string labels answered, by their id (label_id)

    def __repr__(self) -> str:
        return f"RemoteModel({self.url!r}, queries={self.queries}/{self.query_budget})"

    @property
    def remaining(self) -> int:
        return self.query_budget - self.queries

    @property
    def info(self) -> dict[str, Any]:
        """The server's ``/health`` answer, fetched once (costs no queries); ``{}`` if it has none."""
        if self._info is None and self.adapter.health_path is None:
            self._info = dict(self.adapter.info)
        if self._info is None:
            try:
                self._info = {**self.adapter.info, **_probe(self._transport, self.url + self.adapter.health_path)}
            except EndpointError as e:
                if e.status != 404:
                    raise
                self._info = {}
        return self._info

    def summary(self) -> dict[str, Any]:
        """What to record beside a verdict."""
        out = {"endpoint": self.url, "query_budget": self.query_budget, "queries": self.queries,
               "answered": self.answered, "requests": self.requests}
        if self.log is not None:
            out["answered_from_log"] = self.from_log
        return out

    @classmethod
    def replaying(cls, url: str, info: dict[str, Any], log: QueryLog, *, check_images: bool,
                  adapter: Adapter = SERVE) -> "RemoteModel":
        """A model that answers only from ``log``, by query index, and never opens a connection."""
        m = cls(url, query_budget=0, log=log, adapter=adapter)
        m._info, m.offline, m.check_images = dict(info), True, check_images
        return m

    # ------------------------------------------------------------------ public callables

    def predict_label(self, x: torch.Tensor) -> torch.Tensor:
        """Shape: (b, 3, S, S) in [0, 1] -> (b,) int64 labels from the endpoint."""
        return self._predict(x, want_proba=False)

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Shape: (b, 3, S, S) in [0, 1] -> (b, C) float32 probabilities from the endpoint.

        Raises:
            EndpointError: the endpoint serves labels only (or any other endpoint failure).
        """
        if self.info.get("labels_only") or self.adapter.probabilities is None:
            raise EndpointError(f"{self.url} serves labels only; score mode needs probabilities "
                                "(verify with --mode blackbox_label)")
        return self._predict(x, want_proba=True)

    # ------------------------------------------------------------------ internals

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise EndpointError(f"queries must be a (b, 3, S, S) tensor, got {shape}")
        size = self.info.get("input_size")
        if isinstance(size, int) and tuple(x.shape[2:]) != (size, size):
            raise EndpointError(f"{self.url} takes {size} px inputs, got {x.shape[-2]}x{x.shape[-1]}")
        x = x.detach().to("cpu", torch.float32).contiguous()
        if x.numel() and not bool(((x >= 0) & (x <= 1)).all()):
            raise EndpointError("queries must be images in [0, 1]")
        return x

    def _chunk_size(self, x: torch.Tensor) -> int:
        chunk = self.batch_size if self.adapter.batch else 1
        cap = self.info.get("max_images")
        if isinstance(cap, int) and cap > 0:
            chunk = min(chunk, cap)
        max_body = self.info.get("max_body_bytes")
        if isinstance(max_body, int) and max_body > 0:
            per_image = math.ceil(x[0].numel() * _B64_BYTES_PER_FLOAT) + 1
            chunk = min(chunk, max(1, (max_body - 1024) // per_image))
        return chunk

    def _answer_limit(self, n: int) -> int:
        """Most bytes a ``/predict`` answer for ``n`` images may take: every probability and label, verbose."""
        classes = self.info.get("num_classes")
        if isinstance(classes, bool) or not isinstance(classes, int) or not 0 < classes <= MAX_CLASSES:
            classes = MAX_CLASSES
        return n * (classes + 1) * BYTES_PER_NUMBER + ANSWER_ALLOWANCE

    def _budget_error(self, needed: int) -> EndpointError:
        return EndpointError(f"query budget of {self.query_budget} exhausted: {needed} more queries needed "
                             f"({self.queries} used)")

    def _predict(self, x: torch.Tensor, *, want_proba: bool) -> torch.Tensor:
        x = self._check_input(x)
        b = len(x)
        if self.log is None:
            if self.queries + b > self.query_budget:
                raise self._budget_error(b)
            if b == 0:
                return self._empty(want_proba)
            step = self._chunk_size(x)
            return torch.cat([self._request(x[i : i + step], want_proba) for i in range(0, b, step)])
        return self._predict_logged(x, want_proba)

    def _empty(self, want_proba: bool) -> torch.Tensor:
        return torch.empty(0, self.info.get("num_classes", 0)) if want_proba else torch.empty(0, dtype=torch.long)

    def _wire(self, x: torch.Tensor) -> list[bytes]:
        """The exact bytes each image is sent as (the adapter's encoding: float32 or PNG)."""
        return self.adapter.wire(x)

    def _predict_logged(self, x: torch.Tensor, want_proba: bool) -> torch.Tensor:
        """Answers from the log where it has them; the other images are asked once each, and logged."""
        log, first = self.log, self.position
        hashes = [image_sha256(w) for w in self._wire(x)]
        self.position += len(x)
        send: dict[str, int] = {}  # image hash -> index of the query that asks it
        for i, h in enumerate(hashes, first):
            e = log.by_index.get(i)
            if self.offline:
                if e is None:
                    raise EndpointError(f"{log.path}: query {i} is not in the log")
                if self.check_images and e["image_sha256"] != h:
                    raise EndpointError(f"{log.path}: query {i}'s logged image is not the query the secret and the "
                                        "hold-out images give (image SHA-256 differs)")
            elif e is not None and e["image_sha256"] != h:
                raise EndpointError(f"{log.path}: query {i} logged another image than this verification asks; the "
                                    "log belongs to another run: choose another run.name")
            elif e is None and h not in log.by_image:
                send.setdefault(h, i)
        if len(send) > self.remaining:
            raise self._budget_error(len(send))
        todo = torch.stack([x[i - first] for i in send.values()]) if send else x[:0]
        step = self._chunk_size(x) if send else 1
        for lo in range(0, len(todo), step):
            part = list(send.items())[lo : lo + step]
            data = self._exchange(todo[lo : lo + step])
            log.log_exchange([(i, h) for h, i in part], data)
        rows = []
        for i, h in enumerate(hashes, first):
            e = log.by_index.get(i)
            if e is None:
                e = log.log_repeat(i, h) if log.by_image[h]["index"] != i else log.by_index[i]
            if send.get(h) != i:
                self.from_log += 1
            rows.append(self._logged_answer(e, want_proba))
        self.answered += len(send)
        return torch.stack(rows) if rows else self._empty(want_proba)

    def _logged_answer(self, e: dict, want_proba: bool) -> torch.Tensor:
        key = (e["exchange"], want_proba)
        if key not in self._parsed:
            data, parts = self.log.responses[e["exchange"]]
            self._parsed[key] = self._parse(data, parts, want_proba)
        return self._parsed[key][e["part"]]

    def _exchange(self, x: torch.Tensor) -> bytes:
        """One ``/predict`` exchange for the images ``x``: the answer's raw bytes (within the budget and limits)."""
        n = len(x)
        body, content_type = self.adapter.request(x, self._wire(x))

        def before_attempt(attempt: int, last: str) -> None:
            if self.queries + n > self.query_budget:
                err = self._budget_error(n)
                if attempt:
                    err = EndpointError(f"{err}; cannot retry after: {last}")
                raise err

        def after_attempt() -> None:
            self.queries += n
            self.requests += 1

        return self._transport.exchange(self.predict_url, body, max_bytes=self._answer_limit(n),
                                        before_attempt=before_attempt, after_attempt=after_attempt,
                                        content_type=content_type)

    def _request(self, x: torch.Tensor, want_proba: bool) -> torch.Tensor:
        n = len(x)
        out = self._parse(self._exchange(x), n, want_proba)
        self.answered += n
        return out

    def _parse(self, data: bytes, n: int, want_proba: bool) -> torch.Tensor:
        url = self.predict_url
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise EndpointError(f"{url} answered with something that is not JSON: {data[:60]!r}") from None
        if not isinstance(obj, dict):
            raise EndpointError(f"{url} answered a JSON {type(obj).__name__}, expected an object with 'labels'")
        num_classes = self.info.get("num_classes")
        if want_proba:
            path = self.adapter.probabilities
            proba = self.adapter.answer(obj, path)
            if proba is None:
                hint = " (it serves labels only)" if self.adapter.answer(obj, self.adapter.labels) is not None else ""
                raise EndpointError(f"{url}: answer has no '{path}'{hint}")
            try:
                p = torch.tensor(proba, dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError):
                raise EndpointError(f"{url}: '{path}' is not a (b, C) table of numbers") from None
            if p.ndim != 2 or len(p) != n or p.shape[1] < 1:
                raise EndpointError(f"{url}: got probabilities of shape {tuple(p.shape)} for {n} images")
            if isinstance(num_classes, int) and p.shape[1] != num_classes:
                raise EndpointError(f"{url}: got {p.shape[1]} probabilities per image, "
                                    f"the server has {num_classes} classes")
            if not bool(torch.isfinite(p).all()) or bool((p < -1e-6).any()) or \
                    not bool(torch.allclose(p.double().sum(1), torch.ones(n, dtype=torch.float64), atol=1e-3)):
                raise EndpointError(f"{url}: '{path}' are not probability vectors (non-negative, summing to 1)")
            return p
        labels = self.adapter.answer(obj, self.adapter.labels)
        if not isinstance(labels, list):
            raise EndpointError(f"{url}: answer has no '{self.adapter.labels}' list "
                                f"(keys: {', '.join(map(str, obj)) or 'none'})")
        if len(labels) != n:
            raise EndpointError(f"{url}: got {len(labels)} labels for {n} images")
        labels = [self.adapter.label_of(v) for v in labels]
        if any(v is None for v in labels):
            hint = f" (label_item '{self.adapter.label_item}')" if self.adapter.label_item else \
                " (for a list of objects, set the adapter's label_item)"
            raise EndpointError(f"{url}: {LABELS_ERROR}{hint}")
        hi = num_classes if isinstance(num_classes, int) else None
        bad = [v for v in labels if isinstance(v, int) and (v < 0 or (hi is not None and v >= hi))]
        if bad:  # integer labels are class indices; a string label is a name, with no range to check
            rng = f"[0, {hi})" if hi is not None else "non-negative"
            raise EndpointError(f"{url}: label {bad[0]} is out of range ({rng})")
        names = {label_id(v): v for v in labels if isinstance(v, str)}
        self.label_names.update(names)
        try:
            return torch.tensor([label_id(v) if isinstance(v, str) else v for v in labels], dtype=torch.long)
        except (OverflowError, RuntimeError):
            raise EndpointError(f"{url}: labels do not fit in int64") from None
