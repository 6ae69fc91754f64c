"""Win rates of a policy's responses against reference responses of the same prompts, with
their standard errors, and the length-controlled win rate that sees through length hacking.

A judgement is a preference in [0, 1] for the new response over the reference one (1: new
wins, 0.5: a tie, 0: the reference wins). ``judged`` turns two lists of pointwise scores into
preferences (a higher score wins; equal scores tie). ``figures`` gives:

- ``win_rate``: the mean preference, and ``win_rate_se``, its standard error (the sample
  standard deviation of the preferences over sqrt(n));
- ``ties``: the share of ties; ``new_length`` and ``reference_length``: mean characters;
- ``lc_win_rate``: AlpacaEval 2's length-controlled win rate without its instruction-
  difficulty term (Dubois et al. 2024): the logistic regression of the preference on an
  intercept and ``tanh(d / sd(d))``, ``d`` each pair's length difference in characters (new
  less reference), fitted by maximum likelihood (soft labels: a tie is half a win), then
  predicted at no length difference, ``sigmoid(b0)``; its standard error by the delta method
  from the fit's inverse Fisher information, ``p (1 - p) se(b0)``. A judge that rewards
  length and nothing else gives a raw win rate that follows the length difference and a
  length-controlled one of 0.5. ``lc_length_coef`` is the fitted length weight ``b1``.

Preferences that are all one value (every pair won, or every pair lost) leave the
regression without a finite optimum: the length-controlled figures are then ``None``.
"""

from __future__ import annotations

import math

import numpy as np


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(z / 2))  # no overflow for any z


def preference(new: float, reference: float) -> float:
    """One pair's preference from pointwise scores: 1 where new scores higher, 0.5 where
    they are equal, else 0."""
    return 1.0 if new > reference else 0.5 if new == reference else 0.0


def judged(new: list[float], reference: list[float]) -> list[float]:
    """``preference`` of each aligned pair."""
    return [preference(a, b) for a, b in zip(new, reference, strict=True)]


def length_controlled(
    prefs: list[float], length_diff: list[float], steps: int = 100, tol: float = 1e-12
) -> tuple[float, float, float] | None:
    """``(lc_win_rate, its standard error, length coefficient b1)`` (see the module), or
    ``None`` where the fit has no finite optimum (all preferences equal, or perfectly
    separated by length). Newton's method on the log-likelihood (iteratively reweighted
    least squares) in float64; the length term is left out when every difference is equal
    (then the intercept alone is the raw win rate's logit)."""
    y = np.asarray(prefs, dtype=np.float64)
    d = np.asarray(length_diff, dtype=np.float64)
    if len(y) < 2 or y.min() == y.max():
        return None
    sd = d.std(ddof=1)
    cols = [np.ones_like(d)] + ([np.tanh(d / sd)] if sd > 0 else [])
    x = np.stack(cols, axis=1)
    beta = np.zeros(x.shape[1])
    for _ in range(steps):
        p = _sigmoid(x @ beta)
        info = x.T @ (x * (p * (1 - p))[:, None])  # the Fisher information
        try:
            step = np.linalg.solve(info, x.T @ (y - p))
        except np.linalg.LinAlgError:
            return None
        beta = beta + step
        if not np.isfinite(beta).all() or np.abs(beta).max() > 30:
            return None  # separated by length: the coefficients run off
        if np.abs(step).max() < tol:
            break
    else:
        return None  # no convergence
    p = _sigmoid(x @ beta)
    cov = np.linalg.inv(x.T @ (x * (p * (1 - p))[:, None]))
    lc = 1 / (1 + math.exp(-beta[0]))
    se = lc * (1 - lc) * math.sqrt(cov[0, 0])
    return lc, se, float(beta[1]) if len(beta) > 1 else 0.0


def figures(prefs: list[float], new_lengths: list[int], reference_lengths: list[int]) -> dict:
    """Every figure of the module for aligned pairs (preferences, and the characters of each
    side's response); an empty dict for no pairs."""
    n = len(prefs)
    if not n:
        return {}
    mean = sum(prefs) / n
    sd = math.sqrt(sum((p - mean) ** 2 for p in prefs) / (n - 1)) if n > 1 else 0.0
    out = {
        "win_rate": round(mean, 4),
        "win_rate_se": round(sd / math.sqrt(n), 4),
        "ties": round(sum(p == 0.5 for p in prefs) / n, 4),
        "pairs": n,
        "new_length": round(sum(new_lengths) / n, 1),
        "reference_length": round(sum(reference_lengths) / n, 1),
    }
    diff = [a - b for a, b in zip(new_lengths, reference_lengths, strict=True)]
    lc = length_controlled(prefs, diff)
    out["lc_win_rate"], out["lc_win_rate_se"], out["lc_length_coef"] = (
        (round(lc[0], 4), round(lc[1], 4), round(lc[2], 4)) if lc else (None, None, None)
    )
    return out
