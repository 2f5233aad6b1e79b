"""The owner's draw among J + 1 candidate secrets (METHOD.md, stage 3, item 1).

Stage 1 makes J + 1 candidates from seeds that follow from ``run.seed``
(:func:`candidate_seeds`), optionally skipping twins (:func:`distinct_candidates`,
``plan.twin_cosine``), and the owner's secret is the candidate a digest of all of
them draws (:func:`draw_digest`, :func:`drawn_index`); the others are the
alternatives. The plan records the draw (:func:`owner_draw_record`) and
:func:`check_owner_draw` recomputes it from the secret and the alternatives file.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from dist_awenc.errors import ArtifactError, TamperedSecretError
from dist_awenc.log import warn
from dist_awenc.watermark.secret import AlternativeSecrets, Secret, alternatives_path, load_alternatives

DRAW_FORMAT = "dist_awenc.owner_draw/1"
TWIN_STREAM_FACTOR = 3  # the twin rule gives up after making this many times J + 1 candidates
DRAW_SEEDS_LISTED = 64  # the plan lists the candidates' seeds up to this many; beyond, their derivation alone


def alternative_seeds(owner_seed: int, count: int) -> list[int]:
    """``count`` seeds derived from ``owner_seed`` and never equal to it."""
    state = np.random.SeedSequence([int(owner_seed), 0xA17E]).generate_state(count + 1, dtype=np.uint32)
    return [int(s) for s in state if int(s) != int(owner_seed)][:count]


def candidate_seeds(run_seed: int, alternatives: int) -> list[int]:
    """The J + 1 candidate secrets' seeds: ``run_seed`` itself, then ``alternative_seeds(run_seed, J)``."""
    return [int(run_seed), *alternative_seeds(run_seed, alternatives)]


def watermark_cosines(deltas: torch.Tensor) -> torch.Tensor:
    """Every pair of watermarks' cosine, (n, n) float64, each delta flattened (the diagonal is 1)."""
    flat = torch.nn.functional.normalize(deltas.detach().to("cpu", torch.float64).flatten(1), dim=1)
    return flat @ flat.T


def distinct_candidates(deltas: torch.Tensor, bound: float, wanted: int) -> list[int]:
    """The stage-1 twin rule: in order, each candidate is kept unless its watermark's cosine with one already kept
    is above ``bound`` (a twin); the first ``wanted`` kept, by index. ``bound`` 1 keeps every candidate."""
    if bound >= 1:
        return list(range(min(wanted, len(deltas))))
    cos, kept = watermark_cosines(deltas).numpy(), []
    for j in range(len(deltas)):
        if len(kept) == wanted:
            break
        if not kept or cos[j, kept].max() <= bound:
            kept.append(j)
    return kept


def draw_digest(seeds: Sequence[int], keys: Sequence[torch.Tensor], deltas: Sequence[torch.Tensor]) -> str:
    """SHA-256 over every candidate in order: its seed, then its key's and its delta's shape and float32 bytes."""
    if not len(seeds) == len(keys) == len(deltas):
        raise ArtifactError(f"owner draw: {len(seeds)} seeds, {len(keys)} keys and {len(deltas)} deltas do not match")
    h = hashlib.sha256(f"{DRAW_FORMAT}|{len(seeds)}|".encode())
    for seed, key, delta in zip(seeds, keys, deltas):
        h.update(int(seed).to_bytes(8, "little", signed=True))
        for t in (key, delta):
            h.update(f"{tuple(t.shape)}|".encode())
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def drawn_index(digest: str, candidates: int) -> int:
    """The owner's candidate: the digest, read as an integer, modulo the number of candidates."""
    return int(digest, 16) % int(candidates)


def owner_draw_record(run_seed: int, seeds: Sequence[int], digest: str, *, twin_cosine: float = 1.0,
                      skipped: Sequence[int] = ()) -> dict[str, Any]:
    """The plan's ``owner_draw``: how many candidates, the drawn index, the digest and where the seeds came from.

    With the twin rule on (``twin_cosine`` < 1) it also records the bound and the ``skipped`` seeds: the seeds are
    then the first candidates + skips of the stream, less the skipped ones, in order."""
    n = len(seeds)
    record: dict[str, Any] = {"format": DRAW_FORMAT, "candidates": n, "index": drawn_index(digest, n), "digest": digest,
                              "run_seed": int(run_seed), "seed_rule": "candidate_seeds(run_seed, candidates - 1)"}
    if twin_cosine < 1:  # only when on: a plan made without the rule keeps its bytes
        record.update(twin_cosine=float(twin_cosine), skipped=[int(s) for s in skipped],
                      seed_rule=f"candidate_seeds(run_seed, candidates + skips - 1) less the skipped seeds, in order "
                                f"(each skipped candidate's watermark had cosine above {twin_cosine:g} with an "
                                f"earlier kept one)")
    if n <= DRAW_SEEDS_LISTED:
        record["seeds"] = [int(s) for s in seeds]
    return record


def check_owner_draw(secret: Secret, alternatives: Optional[AlternativeSecrets]) -> None:
    """Recompute the plan's owner draw from the owner's secret and the alternatives; one-line error if it differs.

    The owner is re-inserted among the alternatives at the recorded index; the
    seeds must be ``candidate_seeds(run_seed, J)`` (with the twin rule: the
    first J + 1 + skips of that stream less the recorded skipped seeds, and no
    two watermarks above the recorded cosine) and the digest of all J + 1
    candidates must be the recorded one and draw that index. That a skipped
    seed did make a twin is not checked here: its candidate is not stored
    (an audit regenerates it from its seed on f0). A plan without alternatives
    has no draw (a single secret) and passes.

    Raises:
        TamperedSecretError: the files do not give the recorded draw.
        ArtifactError: the plan has alternatives but records no draw (a secret made before draws).
    """
    plan = secret.plan or {}
    draw = plan.get("owner_draw")
    if draw is None:
        if not plan.get("alternatives") and not alternatives:
            return
        raise ArtifactError("the secret's plan records no owner draw (made before stage 1 drew the owner's secret "
                            "among J + 1 candidates), so nothing shows the owner did not choose it")
    n, i = int(draw["candidates"]), int(draw["index"])
    j = len(alternatives) if alternatives is not None else 0
    if j + 1 != n or not 0 <= i < n:
        raise TamperedSecretError(f"owner draw: the plan drew candidate {i} of {n} but there are {j} alternatives + the owner's")
    alt = alternatives
    seeds = [*alt.seeds[:i], int(secret.meta.get("seed", -1)), *alt.seeds[i:]]
    skipped = [int(s) for s in draw.get("skipped", [])]
    if len(skipped) > (TWIN_STREAM_FACTOR - 1) * n:
        raise TamperedSecretError(f"owner draw: {len(skipped)} seeds skipped as twins, more than stage 1 ever skips "
                                  f"({TWIN_STREAM_FACTOR - 1} x {n})")
    stream, skipped_set = candidate_seeds(draw["run_seed"], n - 1 + len(skipped)), set(skipped)
    if (seeds != [s for s in stream if s not in skipped_set] or not skipped_set <= set(stream)
            or draw.get("seeds", seeds) != seeds):
        raise TamperedSecretError(f"owner draw: the secrets' seeds are not the {n} candidate seeds of run seed "
                                  f"{draw['run_seed']} in order (owner at index {i}"
                                  + (f", {len(skipped)} skipped as twins)" if skipped else ")"))
    deltas = [*alt.deltas[:i], secret.delta, *alt.deltas[i:]]
    if skipped and "twin_cosine" not in draw:
        raise TamperedSecretError(f"owner draw: {len(skipped)} seeds skipped as twins but the plan records no twin bound")
    if "twin_cosine" in draw:
        bound = float(draw["twin_cosine"])
        cos = watermark_cosines(torch.stack(deltas)).fill_diagonal_(-1.0)
        if float(cos.max()) > bound + 1e-6:
            a, b = divmod(int(cos.argmax()), n)
            raise TamperedSecretError(f"owner draw: candidates {a} and {b} have watermark cosine {float(cos[a, b]):.3f}, "
                                      f"above the plan's twin bound {bound:g}")
    digest = draw_digest(seeds, [*alt.keys[:i], secret.key, *alt.keys[i:]], deltas)
    if digest != draw["digest"] or drawn_index(digest, n) != i:
        raise TamperedSecretError(f"owner draw: the {n} candidates digest to {digest[:16]}..., not the plan's "
                                  f"{str(draw['digest'])[:16]}...; the owner's secret or an alternative was replaced")


def load_plan_alternatives(secret_path: str | Path, secret: Secret) -> Optional[AlternativeSecrets]:
    """The plan's alternative secrets (hash-checked, the owner's draw among them checked), or None when the plan
    has none."""
    if not secret.plan or not secret.plan.get("alternatives"):
        return None
    alt = load_alternatives(alternatives_path(secret_path), expected_sha256=secret.plan.get("alternatives_sha256"))
    if "owner_draw" in secret.plan:
        check_owner_draw(secret, alt)  # the owner's secret is the one the digest of all J + 1 drew, or refused
    else:
        warn("the secret records no owner draw (made before stage 1 drew it among J + 1 candidates): the "
             "permutation p assumes the owner did not choose it among several")
    return alt
