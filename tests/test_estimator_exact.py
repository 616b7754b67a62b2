"""The kernel's noise estimates against exact per-example values.

Digits MLP at a trained state (3 epochs of plain SGD), parameters frozen
(learning rate 1e-12), clients of 12, 40 and 200 rows from an IID and a
Dirichlet(0.1) partition, four batches each (below ``n``; below ``n`` with a
short last microbatch; ``n``; above ``n``), many rounds of fresh shuffles
through the round kernel. The exact ``|G|^2`` and ``tr(Sigma)``
(population normalisation) come from ``jax.vmap(jax.grad(...))`` over the
client's rows. Standard errors are over rounds: a round's estimate is the
mean over its steps, which share one permutation (correlated), while rounds
have independent seeds. Shared machinery:
:mod:`fedjax_bsa.bench.noise_estimator`.
"""

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_bsa.bench.noise_estimator import problem
from fedjax_bsa.bench.noise_estimator import rounds
from fedjax_bsa.bench.noise_estimator import stats
from fedjax_bsa.setup import models

ROUNDS = 80


@pytest.fixture(scope="module")
def result():
  setup, cases, g_k, tr_k, recs, _ = rounds.run(rounds=ROUNDS, chunk=ROUNDS)
  return setup, cases, g_k, tr_k, recs, stats.summarize(setup, cases, g_k,
                                                        tr_k, recs)


def test_cases_cover_the_batch_regimes():
  for n in problem.SIZES:
    got = problem.case_batches(n)
    b = [bb for bb, _ in got]
    assert any(bb < n and bb % problem.MU == 0 for bb in b), (n, b)
    assert any(bb < n and bb % problem.MU for bb in b), (n, b)  # short last
    assert n in b, (n, b)
    assert any(bb > n and bb % n for bb in b), (n, b)
    assert all(-(-bb // problem.MU) >= 2 and s >= 2 for bb, s in got), got


def test_exact_values_are_the_per_example_moments(result):
  """The Gram-matrix values equal |mean g|^2 and mean |g - G|^2 computed
  from the per-example gradients, whose mean is the gradient of the mean
  loss (one client per partition)."""
  setup = result[0]
  host = jax.tree.map(np.asarray, setup.data)
  for name in problem.PARTITIONS:
    k = setup.clients[name, 40]
    rows = host.rows[host.offset[k]:host.offset[k] + 40]
    x, y = host.x[rows], host.y[rows]
    g = problem.per_example_grads(setup.model, setup.params, x, y)
    mean_loss = lambda p: jnp.mean(models.example_losses(
        setup.model.apply, p, jnp.asarray(x), jnp.asarray(y)))
    full = np.asarray(ravel_pytree(jax.grad(mean_loss)(setup.params))[0])
    np.testing.assert_allclose(g.mean(0), full, rtol=1e-4, atol=1e-6)
    G = g.mean(0)
    g_sq, trace = setup.exact[k]
    np.testing.assert_allclose(g_sq, G @ G, rtol=1e-5)
    np.testing.assert_allclose(trace, np.mean(np.sum((g - G) ** 2, 1)),
                               rtol=1e-5)
    assert 0 < g_sq < trace  # the regime that matters: noise dominates


def test_kernel_steps_match_host_recomputation(result):
  """Per round, the kernel's estimates equal fpc_estimates on the same
  rows' microbatch and step norms (recomputed in float64 from the rows
  example_rows gives), and every step yields an estimate."""
  _, cases, g_k, tr_k, recs, _ = result
  for i, c in enumerate(cases):
    rec = recs[i]
    assert rec["ok"].all(), c
    scale = rec["small_sq"].mean()
    np.testing.assert_allclose(g_k[:, i], rec["g"].mean(-1), rtol=0,
                               atol=2e-5 * scale, err_msg=str(c))
    np.testing.assert_allclose(tr_k[:, i], rec["tr"].mean(-1), rtol=0,
                               atol=2e-5 * scale / rec["c_small"],
                               err_msg=str(c))


def _fails(rows, which, fields=("g_sq", "trace", "b_simple")):
  """(case, field, ratio, se) where the estimate is more than 10% and
  more than 3 standard errors away from the exact value."""
  out = []
  for r in rows:
    d = r[which]
    for f in fields:
      ratio, se = d[f + "_ratio"], d[f + "_ratio_se"]
      if not stats.agrees(ratio, se, 1.0):
        out.append((r["partition"], r["n"], r["batch"], f, round(ratio, 3),
                    round(se, 3)))
  return out


def test_corrected_estimates_match_exact_values(result):
  rows = result[5]
  assert len(rows) == 24
  assert not _fails(rows, "corrected"), _fails(rows, "corrected")


def test_uncorrected_estimates_are_detected_as_biased(result):
  """The harmonic-mean two-batch formula on the same draws: its |G|^2 is
  flagged wherever its predicted bias (docs/method.md (a): |G|^2 low by
  tr / (n - 1) for b <= n) is large, and its means sit where that
  prediction puts them."""
  rows = result[5]
  flagged = {(p, n, b) for p, n, b, f, _, _ in _fails(rows, "uncorrected",
                                                      ("g_sq",))}
  big = {(r["partition"], r["n"], r["batch"]) for r in rows
         if abs(r["uncorrected"]["predicted_g_sq_ratio"] - 1) > 0.2}
  assert len(big) >= 12, big            # every IID case and more
  assert big <= flagged, big - flagged
  for r in rows:
    u = r["uncorrected"]
    for f in ("g_sq", "trace"):
      assert stats.agrees(u[f + "_ratio"], u[f + "_ratio_se"],
                          u[f"predicted_{f}_ratio"]), (r["partition"], r["n"],
                                                       r["batch"], f, u)
  # b <= n: the predicted bias is exactly B / (n - 1), the trace n / (n - 1)
  for r in rows:
    if r["batch"] <= r["n"]:
      u, n = r["uncorrected"], r["n"]
      np.testing.assert_allclose(u["predicted_g_sq_ratio"],
                                 1 - r["exact"]["b_simple"] / (n - 1),
                                 rtol=1e-3, atol=1e-4)
      np.testing.assert_allclose(u["predicted_trace_ratio"], n / (n - 1),
                                 rtol=1e-4)
