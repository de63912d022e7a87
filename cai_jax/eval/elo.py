"""Elo scores from pairwise comparisons, fitted as a Bradley-Terry model.

The paper reports helpfulness and harmlessness as Elo scores computed from
crowdworker comparisons.  Unlike sequential (chess-style) Elo updates, a
maximum-likelihood Bradley-Terry fit uses all comparisons at once, so the
result does not depend on the order in which matches are listed.

Model: each model i has a strength s_i (in nats) and

    P(a beats b) = sigmoid(s_a - s_b) = 1 / (1 + 10 ** ((elo_b - elo_a) / 400))

with elo = ELO_PER_NAT * s.  Outcomes may be soft: ``outcome`` is the
probability (or fraction of votes) that model_a won, anywhere in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Hashable, Iterable, Mapping, NamedTuple, Sequence

import numpy as np
from scipy.special import expit

# 400 * log10(e): converts a natural-log strength difference into Elo points.
ELO_PER_NAT = 400.0 / math.log(10.0)

# L2 penalty on strengths (nats^-2).  Equivalent to a N(0, 1/prior) prior:
# std ~ 30 nats ~ 5500 Elo, so it barely moves models that have data, but it
# keeps a model with a perfect record finite.
DEFAULT_PRIOR = 1e-3


class Match(NamedTuple):
    """One comparison: ``outcome`` = probability that ``model_a`` won."""

    model_a: Hashable
    model_b: Hashable
    outcome: float
    prompt_id: Hashable


@dataclass(frozen=True)
class _Encoded:
    """Matches as integer-indexed arrays, in a canonical (order-free) order."""

    models: tuple
    a: np.ndarray  # [N] index of model_a
    b: np.ndarray  # [N] index of model_b
    y: np.ndarray  # [N] outcome in [0, 1]
    prompt: np.ndarray  # [N] index of the prompt group
    n_prompts: int


def _as_match(item: Any) -> Match:
    if isinstance(item, Mapping):
        return Match(item["model_a"], item["model_b"], item["outcome"], item["prompt_id"])
    fields = tuple(item)
    if len(fields) != 4:
        raise ValueError(
            f"a match must be (model_a, model_b, outcome, prompt_id); got {item!r}"
        )
    return Match(*fields)


def _encode(matches: Iterable[Any]) -> _Encoded:
    rows = [_as_match(m) for m in matches]
    if not rows:
        raise ValueError("no matches given")
    y = np.array([float(r.outcome) for r in rows], dtype=np.float64)
    bad = ~((y >= 0.0) & (y <= 1.0))  # also catches NaN
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"outcomes must lie in [0, 1]; match {i} has {rows[i].outcome!r}")
    for i, r in enumerate(rows):
        if r.model_a == r.model_b:
            raise ValueError(f"match {i} compares model {r.model_a!r} with itself")

    # Sort names and prompt ids so indices do not depend on input order.
    models = tuple(sorted({r.model_a for r in rows} | {r.model_b for r in rows}, key=repr))
    prompts = sorted({r.prompt_id for r in rows}, key=repr)
    m_index = {m: i for i, m in enumerate(models)}
    p_index = {p: i for i, p in enumerate(prompts)}
    a = np.array([m_index[r.model_a] for r in rows], dtype=np.int64)
    b = np.array([m_index[r.model_b] for r in rows], dtype=np.int64)
    prompt = np.array([p_index[r.prompt_id] for r in rows], dtype=np.int64)

    # Canonical row order: floating-point sums then see the same sequence of
    # terms whatever the caller's order, making the fit bit-for-bit invariant.
    order = np.lexsort((y, b, a, prompt))
    return _Encoded(models, a[order], b[order], y[order], prompt[order], len(prompts))


def _neg_log_posterior(s, a, b, y, w, prior):
    d = s[a] - s[b]
    # -log sigmoid(x) = logaddexp(0, -x), stable for large |x|.
    nll = w * (y * np.logaddexp(0.0, -d) + (1.0 - y) * np.logaddexp(0.0, d))
    return nll.sum() + 0.5 * prior * np.dot(s, s)


def _fit_strengths(
    enc: _Encoded,
    weights: np.ndarray,
    prior: float,
    init: np.ndarray | None = None,
    tol: float = 1e-10,
    max_iter: int = 200,
) -> np.ndarray:
    """Damped Newton's method on the (convex) negative log posterior."""
    n = len(enc.models)
    a, b, y, w = enc.a, enc.b, enc.y, weights
    s = np.zeros(n) if init is None else np.array(init, dtype=np.float64)
    s -= s.mean()
    # The likelihood only sees differences, so the Hessian has eigenvalue
    # `prior` along the all-ones direction.  Adding ones*ones^T/n lifts that
    # eigenvalue to prior+1 without changing steps that sum to zero, which
    # keeps the solve well conditioned however tiny the prior is.
    lift = np.full((n, n), 1.0 / n)
    obj = _neg_log_posterior(s, a, b, y, w, prior)
    for _ in range(max_iter):
        p = expit(s[a] - s[b])
        r = w * (p - y)
        grad = np.bincount(a, r, n) - np.bincount(b, r, n) + prior * s
        h = w * p * (1.0 - p)
        off = np.bincount(a * n + b, h, n * n).reshape(n, n)
        hess = np.diag(np.bincount(a, h, n) + np.bincount(b, h, n) + prior) - off - off.T + lift
        step = np.linalg.solve(hess, grad)
        step -= step.mean()  # stay on the sum-zero plane, where the optimum lies

        # Backtracking (Armijo) line search; Newton's full step is usually taken.
        slope = float(np.dot(grad, step))
        t = 1.0
        while True:
            s_new = s - t * step
            obj_new = _neg_log_posterior(s_new, a, b, y, w, prior)
            if obj_new <= obj - 1e-4 * t * slope or t < 1e-10:
                break
            t *= 0.5
        s, obj = s_new, obj_new
        if np.max(np.abs(t * step)) < tol:
            return s
    raise RuntimeError(
        f"Bradley-Terry fit did not converge in {max_iter} Newton steps; "
        "try a larger prior"
    )


def fit_bradley_terry(
    matches: Iterable[Any], prior: float = DEFAULT_PRIOR
) -> dict[Hashable, float]:
    """Maximum a posteriori Bradley-Terry strengths (nats), centred to sum 0.

    Models in separate, never-compared groups are each pulled to mean 0 by the
    prior, so their relative strengths are meaningless.
    """
    if not prior > 0:
        raise ValueError(f"prior must be > 0 (it keeps perfect records finite); got {prior}")
    enc = _encode(matches)
    s = _fit_strengths(enc, np.ones(len(enc.y)), prior)
    return dict(zip(enc.models, s.tolist()))


def elo_win_probability(elo_a: float, elo_b: float) -> float:
    """P(a beats b) implied by two Elo scores."""
    return 1.0 / (1.0 + 10.0 ** ((elo_b - elo_a) / 400.0))


@dataclass(frozen=True)
class EloResult:
    """Elo scores with bootstrap confidence intervals, keyed by model name."""

    models: tuple
    elo: dict
    lower: dict
    upper: dict
    n_matches: dict
    reference: Hashable
    level: float
    n_bootstrap: int

    def to_markdown(self, precision: int = 1) -> str:
        """Markdown table, strongest model first."""
        pct = f"{100 * self.level:g}%"
        lines = [
            f"| Model | Elo | {pct} CI | Matches |",
            "|---|---:|---:|---:|",
        ]

        def fmt(x):
            return "n/a" if not np.isfinite(x) else f"{x:.{precision}f}"

        for m in sorted(self.models, key=lambda m: (-self.elo[m], repr(m))):
            name = f"{m} (ref)" if m == self.reference else str(m)
            ci = f"[{fmt(self.lower[m])}, {fmt(self.upper[m])}]"
            lines.append(f"| {name} | {fmt(self.elo[m])} | {ci} | {self.n_matches[m]} |")
        return "\n".join(lines) + "\n"


def fit_elo(
    matches: Iterable[Any],
    reference: Hashable,
    *,
    n_bootstrap: int = 1000,
    level: float = 0.95,
    prior: float = DEFAULT_PRIOR,
    seed: int = 0,
) -> EloResult:
    """Fit Elo scores (reference model = 0) with prompt-bootstrap intervals.

    Intervals are percentile intervals over ``n_bootstrap`` refits on prompts
    resampled with replacement; all matches sharing a prompt_id move together,
    because judgements on the same prompt are correlated.  A model absent from
    a resample (or a resample without the reference) is left out of that
    replicate.  ``n_bootstrap=0`` skips the bootstrap (intervals are NaN).
    """
    if not prior > 0:
        raise ValueError(f"prior must be > 0 (it keeps perfect records finite); got {prior}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1); got {level}")
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0; got {n_bootstrap}")
    enc = _encode(matches)
    if reference not in enc.models:
        raise ValueError(f"unknown reference model {reference!r}; known: {list(enc.models)}")
    ref = enc.models.index(reference)
    n = len(enc.models)

    s_hat = _fit_strengths(enc, np.ones(len(enc.y)), prior)
    elo = ELO_PER_NAT * (s_hat - s_hat[ref])
    elo[ref] = 0.0  # exact, not just up to rounding

    lower = np.full(n, np.nan)
    upper = np.full(n, np.nan)
    if n_bootstrap > 0:
        rng = np.random.default_rng(seed)
        reps = np.full((n_bootstrap, n), np.nan)
        for k in range(n_bootstrap):
            # Resampling prompts == weighting each match by its prompt's draw count.
            draws = np.bincount(rng.integers(0, enc.n_prompts, enc.n_prompts), minlength=enc.n_prompts)
            w = draws[enc.prompt].astype(np.float64)
            present = (np.bincount(enc.a, w, n) + np.bincount(enc.b, w, n)) > 0
            if not present[ref]:
                continue
            s = _fit_strengths(enc, w, prior, init=s_hat)
            reps[k] = np.where(present, ELO_PER_NAT * (s - s[ref]), np.nan)
            reps[k, ref] = 0.0
        alpha = 1.0 - level
        for i in range(n):
            col = reps[:, i][np.isfinite(reps[:, i])]
            if col.size:
                lower[i], upper[i] = np.quantile(col, [alpha / 2, 1 - alpha / 2])

    counts = np.bincount(enc.a, minlength=n) + np.bincount(enc.b, minlength=n)
    return EloResult(
        models=enc.models,
        elo=dict(zip(enc.models, elo.tolist())),
        lower=dict(zip(enc.models, lower.tolist())),
        upper=dict(zip(enc.models, upper.tolist())),
        n_matches=dict(zip(enc.models, counts.tolist())),
        reference=reference,
        level=level,
        n_bootstrap=n_bootstrap,
    )


@dataclass(frozen=True)
class WinRates:
    """rates[i, j] = mean outcome of models[i] against models[j] (NaN if never met)."""

    models: tuple
    rates: np.ndarray
    counts: np.ndarray


def win_rate_matrix(matches: Iterable[Any], models: Sequence[Hashable] | None = None) -> WinRates:
    """Pairwise win rates, counting each match from both sides.

    Soft outcomes count fractionally (a 0.7 outcome is 0.7 of a win for a and
    0.3 for b).  ``models`` fixes the row order; by default names are sorted.
    """
    rows = [_as_match(m) for m in matches]
    if not rows:
        raise ValueError("no matches given")
    if models is None:
        models = sorted({r.model_a for r in rows} | {r.model_b for r in rows}, key=repr)
    models = tuple(models)
    index = {m: i for i, m in enumerate(models)}
    n = len(models)
    wins = np.zeros((n, n))
    counts = np.zeros((n, n), dtype=np.int64)
    for r in rows:
        y = float(r.outcome)
        if not 0.0 <= y <= 1.0:
            raise ValueError(f"outcomes must lie in [0, 1]; got {r.outcome!r}")
        if r.model_a not in index or r.model_b not in index:
            raise ValueError(f"match between {r.model_a!r} and {r.model_b!r} uses a model not in `models`")
        i, j = index[r.model_a], index[r.model_b]
        wins[i, j] += y
        wins[j, i] += 1.0 - y
        counts[i, j] += 1
        counts[j, i] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = np.where(counts > 0, wins / np.maximum(counts, 1), np.nan)
    return WinRates(models, rates, counts)
