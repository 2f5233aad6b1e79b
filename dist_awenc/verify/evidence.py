"""The evidence bundle of a black-box verification: an append-only, hash-chained query log and its manifest.

Every query a black-box verification sends to a suspect's API is logged, as
it goes, in ``queries.jsonl`` in the run folder, one JSON object a line:

``index``
    the query's position in the verification (0, 1, ...: the order the test asks them in);
``image_sha256``
    SHA-256 of the exact bytes of the image as sent;
``time``
    when the answer arrived (UTC, ISO 8601);
``exchange``, ``part``
    the HTTP exchange that answered it and the image's position in that exchange;
``parts``, ``response``
    only in the first entry of an exchange: how many images it sent and the
    raw bytes of the answer (base64), exactly what the verdict was computed from;
``prev``, ``hash``
    ``hash = SHA-256(prev + canonical JSON of the entry without "hash")``,
    ``prev`` the previous entry's hash (64 zeros for the first).

A query whose image is already logged (asked at another position, or by an
interrupted run of the same verification) is answered from the log and logged
again with the exchange that answered it: the API is never asked twice for the
same image. The chain's final digest goes into ``verdict.json``
(``evidence.chain_sha256``); ``bundle.json`` holds the plan, the secret's
SHA-256, the settings, the calibration's hash (``calibration.json`` is a copy)
the endpoint's ``/health`` answer and the adapter (its wire format; header names only). ``awenc verify --replay DIR``
(:mod:`dist_awenc.verify.replay`) recomputes the verdict from these alone.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from dist_awenc.errors import ArtifactError
from dist_awenc.files import atomic_write_text, read_json, sha256_file
from dist_awenc.log import warn
from dist_awenc.verify.core import round_up

BUNDLE_FORMAT = "dist_awenc.bundle/1"
LOG_NAME = "queries.jsonl"
MANIFEST_NAME = "bundle.json"
CALIBRATION_COPY = "calibration.json"
GENESIS = "0" * 64
_FIELDS = {"index", "image_sha256", "time", "exchange", "part", "prev", "hash"}


def canonical(obj: Any) -> bytes:
    """The canonical JSON bytes of ``obj`` (sorted keys, no spaces, ASCII), the form every hash here covers."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def entry_hash(prev: str, body: dict) -> str:
    """``SHA-256(prev + canonical JSON of body)``; ``body`` is the entry without its ``hash``."""
    return hashlib.sha256(prev.encode("ascii") + canonical(body)).hexdigest()


def plan_sha256(plan: dict) -> str:
    return hashlib.sha256(canonical(plan or {})).hexdigest()


class QueryLog:
    """The query log of one verification, checked on opening and appended to durably.

    Attributes:
        head: the last entry's hash (the chain's final digest; ``GENESIS`` when empty).
        by_index: query index -> entry.
        by_image: image SHA-256 -> the first entry holding it.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.head = GENESIS
        self.entries: list[dict] = []
        self.by_index: dict[int, dict] = {}
        self.by_image: dict[str, dict] = {}
        self.responses: dict[int, tuple[bytes, int]] = {}  # exchange -> (answer bytes, images in it)
        if self.path.exists():
            self._load()

    def __len__(self) -> int:
        return len(self.entries)

    def _fail(self, line: int, entry: Any, why: str) -> ArtifactError:
        q = entry.get("index") if isinstance(entry, dict) else None
        return ArtifactError(f"{self.path}: entry {line}" + (f" (query {q})" if q is not None else "") + f" {why}")

    def _load(self) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):  # a crash in the middle of the last write: that answer is lost
            keep = data.rfind(b"\n") + 1
            warn(f"{self.path}: the last entry was cut off (an interrupted write); dropping it, its queries are asked again")
            with open(self.path, "r+b") as f:
                f.truncate(keep)
                os.fsync(f.fileno())
            data = data[:keep]
        for line, text in enumerate(data.splitlines(), 1):
            try:
                e = json.loads(text)
            except ValueError:
                raise self._fail(line, None, "is not JSON: the log was edited") from None
            if not isinstance(e, dict) or not _FIELDS <= set(e):
                raise self._fail(line, e, f"lacks a field of {sorted(_FIELDS)}: the log was edited")
            body = {k: v for k, v in e.items() if k != "hash"}
            if e["prev"] != self.head:
                raise self._fail(line, e, "does not chain to the entry before it (prev differs): entries were "
                                          "removed, inserted or reordered")
            if entry_hash(self.head, body) != e["hash"]:
                raise self._fail(line, e, "was changed: its hash does not match its content")
            self._add(e, line)

    def _add(self, e: dict, line: int) -> None:
        k = e["exchange"]
        if "response" in e:
            try:
                self.responses[k] = (base64.b64decode(e["response"], validate=True), int(e["parts"]))
            except (ValueError, TypeError):
                raise self._fail(line, e, "holds a response that is not base64") from None
        elif k not in self.responses:
            raise self._fail(line, e, f"refers to exchange {k}, which no earlier entry holds")
        if e["index"] in self.by_index:
            raise self._fail(line, e, f"logs query {e['index']} a second time")
        self.entries.append(e)
        self.head = e["hash"]
        self.by_index[e["index"]] = e
        self.by_image.setdefault(e["image_sha256"], e)

    def _append(self, bodies: list[dict]) -> None:
        lines, head = [], self.head
        done = []
        for body in bodies:
            body = {**body, "prev": head}
            head = entry_hash(head, body)
            e = {**body, "hash": head}
            done.append(e)
            lines.append(canonical(e) + b"\n")
        with open(self.path, "ab") as f:
            f.write(b"".join(lines))
            f.flush()
            os.fsync(f.fileno())
        for e in done:
            self._add(e, len(self.entries) + 1)

    def log_exchange(self, queries: list[tuple[int, str]], response: bytes) -> int:
        """Log one exchange: the (index, image SHA-256) of each image it sent and the answer's raw bytes."""
        k = 1 + max(self.responses, default=-1)
        now = _now()
        bodies = [{"index": i, "image_sha256": h, "time": now, "exchange": k, "part": j}
                  for j, (i, h) in enumerate(queries)]
        bodies[0].update(parts=len(queries), response=base64.b64encode(response).decode("ascii"))
        self._append(bodies)
        return k

    def log_repeat(self, index: int, image_sha256: str) -> dict:
        """Log a query answered by an earlier exchange (its image was already asked)."""
        first = self.by_image[image_sha256]
        self._append([{"index": index, "image_sha256": image_sha256, "time": _now(), "exchange": first["exchange"],
                       "part": first["part"]}])
        return self.by_index[index]

    def summary(self) -> dict:
        return {"query_log": LOG_NAME, "entries": len(self.entries), "exchanges": len(self.responses),
                "chain_sha256": self.head}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z"


def image_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def start_bundle(run_dir: Path, *, mode: str, endpoint: str, endpoint_info: dict, secret_sha256: str, plan: dict,
                 settings: dict, data: dict, calibration_path: Optional[str], adapter: dict) -> QueryLog:
    """Write (or, resuming, check) ``bundle.json`` and the calibration's copy; open the query log."""
    manifest = {"format": BUNDLE_FORMAT, "mode": mode, "endpoint": endpoint, "endpoint_info": endpoint_info,
                "secret_sha256": secret_sha256, "plan": plan, "plan_sha256": plan_sha256(plan), "settings": settings,
                "data": data, "query_log": LOG_NAME, "adapter": adapter,
                "calibration": None if calibration_path is None else
                {"sha256": settings["calibration_sha256"], "file": CALIBRATION_COPY}}
    path = run_dir / MANIFEST_NAME
    if path.exists():
        old = read_json(path, ArtifactError, "the evidence bundle's manifest")
        for key in ("mode", "secret_sha256", "plan_sha256", "settings", "calibration", "adapter"):
            if old.get(key) != manifest[key]:
                raise ArtifactError(f"{path}: its {key} differs from this verification's; the query log there belongs "
                                    "to another verification: choose another run.name")
    else:
        if calibration_path is not None:
            copy = run_dir / CALIBRATION_COPY
            shutil.copyfile(calibration_path, copy)
            if sha256_file(copy) != settings["calibration_sha256"]:
                raise ArtifactError(f"{calibration_path} changed while it was copied into the bundle")
        atomic_write_text(path, json.dumps(manifest, indent=2))
    return QueryLog(run_dir / LOG_NAME)


def write_report(run_dir: Path, verdict: dict) -> None:
    """A short ``report.md``: the verdict, what the bundle holds, how to replay it."""
    ev = verdict["evidence"]
    word = "ownership evidence" if verdict["decision"] else "no evidence"
    cal = verdict.get("calibration_sha256")
    p, floor = verdict.get("p_value"), verdict.get("p_floor")
    if p is None:
        enc = f"none ({str(verdict.get('p_source', '')).removeprefix('none: ')}): this test decides nothing"
    else:
        enc = f"{p:.6g} ({verdict.get('p_source')}; the smallest it could be: {floor:.3g})"
        if floor is not None and floor > verdict["alpha"] * (1 + 1e-9):
            enc += f"; it cannot reach alpha = {verdict['alpha']:g}, so it decides nothing at this alpha"
    bound = verdict.get("heldout_fpr_upper_95")
    lines = [
        f"# Black-box verification of {verdict['suspect']}", "",
        f"- verdict: **{word}** (alpha = {verdict['alpha']:g}, decided only by encoder-level p-values)"
        + (" - EXPLORATORY: " + "; ".join(verdict.get("plan_deviations") or []) if verdict.get("exploratory") else ""),
        f"- test: {verdict['mode']}, effect = {verdict['effect']:+.4f}, n = {verdict['n']}, margin = {verdict['threshold']}",
        f"- encoder-level p (would an encoder not derived from the owner's score this?): {enc}",
        f"- image-level p (strength of the effect on this model, given the margin; not a false-positive rate): "
        f"{verdict.get('image_p'):.6g}" if verdict.get("image_p") is not None else "- image-level p: n/a",
        f"- held-out false-positive bound of the calibration: FPR <= {round_up(bound):.3f} (exact 95% upper bound)"
        if bound is not None else "- held-out false-positive bound: none (no calibration)",
        *(f"- also: {t['mode']}, encoder-level p = {t['p_value']:.6g} ({t.get('p_source')}; the smallest it could be: "
          f"{t['p_floor']:.3g}), effect = {t['effect']:+.4f}, {t['details'].get('queries', '?')} queries"
          for t in (verdict.get("tests") or [])[1:] if t.get("p_value") is not None),
        f"- decision: Holm at alpha = {verdict['alpha']:g} over "
        + (", ".join(verdict["overall"]["family"]) or "no test (none can reach alpha)") if verdict.get("overall") else "",
        *_serving_lines(verdict),
        f"- secret SHA-256: `{verdict['secret_sha256']}`",
        f"- calibration SHA-256: `{cal}` (copy: `{CALIBRATION_COPY}`)" if cal else "- calibration: none",
        f"- query log: `{LOG_NAME}`, {ev['entries']} queries in {ev['exchanges']} exchanges, "
        f"final digest `{ev['chain_sha256']}`", "",
        "Every answer the verdict used is in the query log, hash-chained; `bundle.json` holds the plan, the "
        "settings and the endpoint's description. Anyone holding the secret can recompute the verdict without "
        "the suspect or a network:", "",
        f"    awenc verify --replay {run_dir} [secret=PATH] [--published-sha256 HASH_OR_CARD]", "",
    ]
    atomic_write_text(run_dir / "report.md", "\n".join(lines))


def _serving_lines(verdict: dict) -> list[str]:
    """Report lines on what the serving path changed: no decision drawn, another resolution, labels as names."""
    details, out = verdict.get("details") or {}, []
    if verdict.get("no_decision"):
        out.append(f"- {verdict['mode']} draws no decision: {verdict['no_decision']}")
    size, resize = details.get("input_size"), details.get("resize")
    if size and resize:
        out.append(f"- the suspect takes {size['suspect']} px inputs, the secret is {size['secret']} px: every query "
                   f"was marked at {size['secret']} px, then resized ({resize['method']}) before it was sent")
    if details.get("label_names"):
        out.append(f"- labels answered as names ({details['label_names_seen']} distinct): "
                   + ", ".join(repr(n) for n in details["label_names"]))
    return out
