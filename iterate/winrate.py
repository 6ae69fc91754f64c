"""Win rates of a policy's responses against reference responses of the same prompts, with
their standard errors, and the length-controlled win rate that sees through length hacking.

A judgement is a preference in [0, 1] for the new response over the reference one (1: new
wins, 0.5: a tie, 0: the reference wins). ``judged`` turns two lists of pointwise scores into
preferences (a higher score wins; equal scores tie). ``figures`` gives:

- ``win_rate``: the mean preference, and ``win_rate_se``, its standard error, clustered by
  prompt where ``clusters`` names each pair's prompt (an evaluation draws several samples
  per held-out prompt; their preferences are not independent, see ``clustered_se``);
- ``ties``: the share of ties; ``new_length`` and ``reference_length``: mean characters;
- ``lc_win_rate``: AlpacaEval 2's length-controlled win rate without its instruction-
  difficulty term (Dubois et al. 2024): the logistic regression of the preference on an
  intercept and ``tanh(d / sd(d))``, ``d`` each pair's length difference in characters (new
  less reference), fitted by maximum likelihood (soft labels: a tie is half a win), then
  predicted at no length difference, ``sigmoid(b0)``; its standard error by the delta method,
  ``p (1 - p) se(b0)``, ``se(b0)`` from the fit's inverse Fisher information, or with
  ``clusters`` from the cluster-robust sandwich ``I^-1 (sum_g s_g s_g^T) I^-1 G / (G - 1)``
  (``s_g`` the score of prompt g's pairs). A judge that rewards
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


def _groups(clusters: list | None, n: int) -> np.ndarray:
    """Each pair's cluster as an integer 0..G-1 (every pair its own where ``clusters`` is
    None)."""
    if clusters is None:
        return np.arange(n)
    if len(clusters) != n:
        raise ValueError(f"{len(clusters)} cluster labels for {n} pairs")
    return np.unique(np.asarray(clusters, dtype=object).astype(str), return_inverse=True)[1]


def clustered_se(values: list[float], clusters: list | None = None) -> float:
    """The standard error of the mean of ``values``, clustered: ``sqrt(G / (G - 1) *
    sum_g (sum_{i in g} (v_i - mean))^2) / n`` over the G clusters (Liang and Zeger 1986;
    the form Stata and statsmodels use for a mean). Samples of one prompt share its
    difficulty, so their preferences move together: treating them as independent
    understates the error. With every value its own cluster (``clusters`` None) this is the
    familiar ``sd / sqrt(n)``; with one cluster there is no estimate of the spread between
    clusters: 0."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    g = _groups(clusters, n)
    big = int(g.max()) + 1 if n else 0
    if big < 2:
        return 0.0
    sums = np.bincount(g, weights=v - v.mean(), minlength=big)
    return float(math.sqrt(big / (big - 1) * (sums**2).sum()) / n)


def length_controlled(
    prefs: list[float],
    length_diff: list[float],
    clusters: list | None = None,
    steps: int = 100,
    tol: float = 1e-12,
) -> tuple[float, float, float] | None:
    """``(lc_win_rate, its standard error, length coefficient b1)`` (see the module), or
    ``None`` where the fit has no finite optimum (all preferences equal, or perfectly
    separated by length). Newton's method on the log-likelihood (iteratively reweighted
    least squares) in float64; the length term is left out when every difference is equal
    (then the intercept alone is the raw win rate's logit). With ``clusters`` (each pair's
    prompt) the standard error is the cluster-robust sandwich's, else the inverse Fisher
    information's."""
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
    if clusters is not None:  # the sandwich: the scores summed within each cluster
        g = _groups(clusters, len(y))
        big = int(g.max()) + 1
        scores = np.zeros((big, x.shape[1]))
        np.add.at(scores, g, x * (y - p)[:, None])
        meat = scores.T @ scores * (big / (big - 1) if big > 1 else 0.0)
        cov = cov @ meat @ cov
    lc = 1 / (1 + math.exp(-beta[0]))
    se = lc * (1 - lc) * math.sqrt(cov[0, 0])
    return lc, se, float(beta[1]) if len(beta) > 1 else 0.0


def figures(
    prefs: list[float],
    new_lengths: list[int],
    reference_lengths: list[int],
    clusters: list | None = None,
) -> dict:
    """Every figure of the module for aligned pairs (preferences, and the characters of each
    side's response); ``clusters``: each pair's prompt, so the standard errors count the
    prompts, not the pairs (``clustered_se``; ``prompts`` says how many); an empty dict for no
    pairs."""
    n = len(prefs)
    if not n:
        return {}
    mean = sum(prefs) / n
    out = {
        "win_rate": round(mean, 4),
        "win_rate_se": round(clustered_se(prefs, clusters), 4),
        "ties": round(sum(p == 0.5 for p in prefs) / n, 4),
        "pairs": n,
        "new_length": round(sum(new_lengths) / n, 1),
        "reference_length": round(sum(reference_lengths) / n, 1),
    }
    diff = [a - b for a, b in zip(new_lengths, reference_lengths, strict=True)]
    if clusters is not None:
        out["prompts"] = len(set(clusters))
    lc = length_controlled(prefs, diff, clusters)
    out["lc_win_rate"], out["lc_win_rate_se"], out["lc_length_coef"] = (
        (round(lc[0], 4), round(lc[1], 4), round(lc[2], 4)) if lc else (None, None, None)
    )
    return out
