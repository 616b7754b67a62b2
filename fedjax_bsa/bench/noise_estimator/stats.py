"""The noise-estimator check's statistics: standard errors and acceptance.

Part of :mod:`fedjax_bsa.bench.noise_estimator` (whose
:mod:`~fedjax_bsa.bench.noise_estimator.main` describes the check): the
expected uncorrected estimates (:func:`predicted_uncorrected`), means and
ratios with their standard errors over rounds (:func:`mean_se`,
:func:`ratio_se`), the acceptance test (:func:`agrees`), and the per-case
and overall summaries (:func:`summarize`, :func:`overall`).
"""

from __future__ import annotations

import numpy as np

from fedjax_bsa.bench.noise_estimator.problem import client_sizes
from fedjax_bsa.bench.noise_estimator.problem import MU
from fedjax_bsa.bench.noise_estimator.problem import Setup

__all__ = ["predicted_uncorrected", "mean_se", "ratio_se", "agrees",
           "summarize", "overall"]


def predicted_uncorrected(g_sq, trace, c_small, c_big, b_small, batch
                          ) -> tuple[float, float]:
  """Expectations of the uncorrected estimates given the exact values.

  ``E small_sq = |G|^2 + tr c_small`` and ``E big_sq = |G|^2 + tr c_big``
  (``docs/method.md`` (a)); the uncorrected formula is linear in both, so
  its expectation is the formula at these expectations.

  >>> g, t = predicted_uncorrected(1.0, 11.0, (12 - 4) / (4 * 11), 0.0,
  ...                              4, 12)   # n = 12, b = n: B / (n - 1) = 1
  >>> round(g, 6), round(t, 6)
  (0.0, 12.0)
  """
  es = g_sq + trace * c_small
  eb = g_sq + trace * c_big
  return ((batch * eb - b_small * es) / (batch - b_small),
          (es - eb) / (1 / b_small - 1 / batch))


def mean_se(x) -> tuple[float, float]:
  """Mean and standard error over the leading (rounds) axis."""
  x = np.asarray(x, np.float64)
  return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x)))


def ratio_se(num, den) -> tuple[float, float]:
  """``mean(num) / mean(den)`` and its delta-method standard error."""
  a, b = np.asarray(num, np.float64), np.asarray(den, np.float64)
  r = a.mean() / b.mean()
  resid = (a - r * b) / b.mean()
  return float(r), float(resid.std(ddof=1) / np.sqrt(len(a)))


def agrees(est: float, se: float, exact: float, rtol: float = 0.1,
           nse: float = 3.0) -> bool:
  """The test's acceptance: within ``rtol`` of ``exact`` or ``nse``
  standard errors from it.

  >>> agrees(1.15, 0.01, 1.0), agrees(1.15, 0.06, 1.0)
  (False, True)
  """
  return abs(est - exact) <= max(rtol * abs(exact), nse * se)


def summarize(setup: Setup, cases, g_k, tr_k, recs) -> list[dict]:
  """Per case: exact values, corrected (kernel) and uncorrected ratios."""
  rows = []
  for i, c in enumerate(cases):
    rec = recs[i]
    g_ex, tr_ex = setup.exact[c.client]
    b_ex = tr_ex / g_ex
    per = lambda a: a.mean(-1)   # per-round mean over steps
    g_m, g_se = mean_se(g_k[:, i])
    t_m, t_se = mean_se(tr_k[:, i])
    bs_m, bs_se = ratio_se(tr_k[:, i], g_k[:, i])
    gu_m, gu_se = mean_se(per(rec["g_u"]))
    tu_m, tu_se = mean_se(per(rec["tr_u"]))
    bu_m, bu_se = ratio_se(per(rec["tr_u"]), per(rec["g_u"]))
    pg, pt = predicted_uncorrected(g_ex, tr_ex, rec["c_small"], rec["c_big"],
                                   rec["b_small"], c.batch)
    rows.append(dict(
        partition=c.partition, n=c.n, batch=c.batch, steps=c.steps,
        microbatch_sizes=client_sizes(c.batch, MU).tolist(),
        c_small=rec["c_small"], c_big=rec["c_big"],
        uncorrected_b_small=rec["b_small"],
        exact=dict(g_sq=g_ex, trace=tr_ex, b_simple=b_ex),
        corrected=dict(
            g_sq_ratio=g_m / g_ex, g_sq_ratio_se=g_se / g_ex,
            trace_ratio=t_m / tr_ex, trace_ratio_se=t_se / tr_ex,
            b_simple_ratio=bs_m / b_ex, b_simple_ratio_se=bs_se / b_ex,
            passes=(agrees(g_m, g_se, g_ex) and agrees(t_m, t_se, tr_ex)
                    and agrees(bs_m, bs_se, b_ex))),
        uncorrected=dict(
            g_sq_ratio=gu_m / g_ex, g_sq_ratio_se=gu_se / g_ex,
            trace_ratio=tu_m / tr_ex, trace_ratio_se=tu_se / tr_ex,
            b_simple_ratio=bu_m / b_ex, b_simple_ratio_se=bu_se / b_ex,
            predicted_g_sq_ratio=pg / g_ex, predicted_trace_ratio=pt / tr_ex,
            passes=(agrees(gu_m, gu_se, g_ex) and agrees(tu_m, tu_se, tr_ex)
                    and agrees(bu_m, bu_se, b_ex))),
    ))
  return rows


def overall(rows, se_floor: float = 1e-5) -> dict:
  """Per estimator: whether every case passes, the largest ``|ratio - 1|``
  and the largest ``|ratio - 1| / se`` per quantity. Standard errors below
  ``se_floor`` (the float32 rounding of an estimate that is exact in every
  round: ``|G|^2`` at ``b = n``) are raised to it."""
  out = {}
  for which in ("corrected", "uncorrected"):
    fields = ("g_sq", "trace", "b_simple")
    out[which] = dict(
        all_pass=all(r[which]["passes"] for r in rows),
        max_abs_ratio_minus_1={f: max(abs(r[which][f + "_ratio"] - 1)
                                      for r in rows) for f in fields},
        max_abs_z={f: max(abs(r[which][f + "_ratio"] - 1)
                          / max(r[which][f + "_ratio_se"], se_floor)
                          for r in rows) for f in fields})
  return out
