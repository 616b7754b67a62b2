"""The kernel's gradient-noise estimates against exact values on digits.

For clients of 12, 40 and 200 rows drawn from an IID and a Dirichlet(0.1)
partition of the digits training set, at the parameters of an MLP after a
few epochs of plain minibatch SGD, this compares

* the exact per-client ``|G|^2 = |mean_i g_i|^2`` and
  ``tr(Sigma) = mean_i |g_i - G|^2`` (population normalisation), from the
  per-example gradients ``jax.vmap(jax.grad(...))`` over the client's rows;
* the means of the round kernel's per-step estimates
  (:func:`fedjax_bsa.kernel.make_round_kernel`, ``ClientStats.grad_sq`` and
  ``.trace``: finite-population coefficients, ``docs/method.md`` (a)) over
  many rounds of fresh shuffles at frozen parameters (learning rate
  ``1e-12``);
* the uncorrected estimates (:func:`fedjax_bsa.noise.two_batch_estimates`
  with the harmonic mean of the microbatch sizes, as the old kernel did) on
  the same draws.

Each client runs four batches: below ``n`` (a multiple of the microbatch),
below ``n`` with a short last microbatch, ``n`` and above ``n``. A *round* is
one job per (client, batch) with its own shuffle seed; each job's estimate is
the mean over its steps, so the rounds are independent and the standard
errors are over rounds (steps within a round share a permutation and are
correlated).

The per-step microbatch and step norms are also recomputed on the host from
the rows :func:`fedjax_bsa.data.federated.example_rows` gives and the Gram
matrix of the per-example gradients (float64); the kernel's per-round
estimates must match that recomputation, and the uncorrected estimates come
from it.

Run::

    python -m benchmarks.noise_estimator [--quick] [--out DIR]

which writes ``noise_estimator.json`` into ``--out`` (default
``benchmarks/results``). Nothing is timed.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import time
from typing import NamedTuple

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_bsa import kernel as kernel_lib
from fedjax_bsa import models
from fedjax_bsa import noise
from fedjax_bsa.data import datasets
from fedjax_bsa.data import federated
from fedjax_bsa.data import partition

__all__ = ["MU", "SIZES", "PARTITIONS", "Case", "Setup", "choose_clients",
           "train", "per_example_grads", "exact_stats", "make_setup",
           "case_batches", "make_cases", "make_kernel", "round_jobs",
           "kernel_estimates", "local_rows", "recompute",
           "predicted_uncorrected", "mean_se", "ratio_se", "agrees",
           "summarize", "overall", "run", "main"]

MU = 4                       # kernel microbatch
SIZES = (12, 40, 200)        # client rows
PARTITIONS = ("iid", "dirichlet")
ALPHA = 0.1                  # Dirichlet concentration
HIDDEN = 32                  # MLP width
FROZEN_LR = 1e-12            # steps do not move float32 parameters
POOL = 7                     # clients in each partition drawn from


class Case(NamedTuple):
  """One (client, batch) pair."""
  partition: str   # "iid" or "dirichlet"
  n: int           # client rows
  client: int      # client index in the data
  batch: int
  steps: int       # steps per round


class Setup(NamedTuple):
  model: models.Model
  params: dict               # trained parameters (one experiment, no axis)
  data: federated.FederatedData  # device arrays, the chosen clients
  clients: dict              # (partition, n) -> client index
  gram: dict                 # client -> float64 [n, n] g g^T
  exact: dict                # client -> (|G|^2, tr(Sigma))
  train_accuracy: float


def choose_clients(labels, sizes=SIZES, seed: int = 0):
  """Row indices of one client per (partition, size).

  Each partition splits the training set into :data:`POOL` clients
  (``partition.iid`` and ``partition.dirichlet(alpha=0.1)``); the client of
  ``n`` rows is a uniformly random ``n``-subset of the smallest unused
  client holding at least ``n`` rows (so it keeps that client's label mix).

  Returns:
    ``[(partition, n, rows)]``.
  """
  rng = np.random.default_rng(seed)
  pools = {"iid": partition.iid(len(labels), POOL, seed),
           "dirichlet": partition.dirichlet(labels, POOL, ALPHA, seed,
                                            min_examples=min(sizes))}
  out = []
  for name in PARTITIONS:
    parts, used = pools[name], set()
    for n in sizes:
      fits = [k for k in np.argsort([len(p) for p in parts], kind="stable")
              if len(parts[k]) >= n and k not in used]
      if not fits:
        raise ValueError(f"partition={name} (seed={seed}) has no unused "
                         f"client of >= {n} rows")
      used.add(fits[0])
      out.append((name, n, rng.choice(parts[fits[0]], n, replace=False)))
  return out


def train(model, x, y, *, epochs: int = 3, lr: float = 0.1,
          batch: int = 32, seed: int = 0):
  """Plain minibatch SGD on ``(x, y)``: the "trained state" parameters."""
  params = model.init(jax.random.key(seed))
  loss = lambda p, xb, yb: jnp.mean(models.example_losses(model.apply, p, xb,
                                                          yb))
  steps = len(y) // batch

  @jax.jit
  def epoch(p, key):
    order = jax.random.permutation(key, len(y))[:steps * batch]
    idx = order.reshape(steps, batch)

    def step(p, i):
      g = jax.grad(loss)(p, x[i], y[i])
      return jax.tree.map(lambda a, b: a - lr * b, p, g), None

    return jax.lax.scan(step, p, idx)[0]

  x, y = jnp.asarray(x), jnp.asarray(y)
  for e in range(epochs):
    params = epoch(params, jax.random.key(1000 + seed * 100 + e))
  return params


def per_example_grads(model, params, x, y) -> np.ndarray:
  """float64 ``[n, P]``: every row's gradient, flattened."""
  def one(xi, yi):
    g = jax.grad(lambda p: models.example_losses(
        model.apply, p, xi[None], yi[None])[0])(params)
    return ravel_pytree(g)[0]
  return np.asarray(jax.jit(jax.vmap(one))(jnp.asarray(x), jnp.asarray(y)),
                    np.float64)


def exact_stats(gram: np.ndarray) -> tuple[float, float]:
  """``(|G|^2, tr(Sigma))`` from the Gram matrix ``K = g g^T`` ``[n, n]``:
  ``|G|^2 = mean(K)``, ``tr = mean(diag K) - |G|^2`` (``1/n``).

  >>> g = np.array([[1.0, 0.0], [3.0, 2.0]])   # G = (2, 1)
  >>> exact_stats(g @ g.T)                     # |G|^2 = 5, tr = (2 + 2) / 2
  (5.0, 2.0)
  """
  g_sq = float(gram.mean())
  return g_sq, float(np.mean(np.diag(gram)) - g_sq)


def make_setup(*, seed: int = 0, epochs: int = 3, hidden: int = HIDDEN,
               sizes=SIZES) -> Setup:
  """Digits, the chosen clients, the trained MLP and exact statistics."""
  ds = datasets.digits()
  model = models.make_model("mlp", (64,), 10, hidden=hidden)
  params = train(model, ds.x_train, ds.y_train, epochs=epochs, seed=seed)
  logits = model.apply(params, jnp.asarray(ds.x_train))
  acc = float(jnp.mean(jnp.argmax(logits, -1) == ds.y_train))
  chosen = choose_clients(ds.y_train, sizes, seed)
  data = federated.from_partition(ds.x_train, ds.y_train,
                                  [rows for _, _, rows in chosen])
  every = np.concatenate([rows for _, _, rows in chosen])
  grads = per_example_grads(model, params, ds.x_train[every],
                            ds.y_train[every])   # one compile for all
  clients, gram, exact = {}, {}, {}
  at = 0
  for k, (name, n, _) in enumerate(chosen):
    clients[name, n] = k
    g = grads[at:at + n]
    at += n
    gram[k] = g @ g.T
    exact[k] = exact_stats(gram[k])
  return Setup(model, params, jax.tree.map(jnp.asarray, data), clients, gram,
               exact, acc)


def case_batches(n: int, mu: int = MU) -> list[tuple[int, int]]:
  """``(batch, steps)`` per client size: below ``n`` (a multiple of ``mu``),
  below ``n`` with a short last microbatch, ``n``, above ``n`` (not a
  multiple of ``n``); steps cover about one pass, at least two.

  >>> case_batches(12), case_batches(200)[-1]
  ([(8, 2), (10, 2), (12, 2), (18, 2)], (252, 2))
  """
  lo = max(2 * mu, (min(n, 4 * mu) // mu) * mu)
  if lo >= n:
    lo = 2 * mu
  short = lo + mu // 2 if lo + mu // 2 < n else lo - mu // 2
  above = n + max(n // 4, mu) + 2 if n % mu == 0 else n + n // 4
  out = []
  for b in (lo, short, n, above):
    out.append((b, max(2, -(-n // b))))
  return out


def make_cases(setup: Setup, sizes=SIZES, mu: int = MU) -> list[Case]:
  return [Case(name, n, setup.clients[name, n], b, s)
          for name in PARTITIONS for n in sizes
          for b, s in case_batches(n, mu)]


def make_kernel(model, lanes: int = 16, mu: int = MU):
  """The jitted round kernel for plain SGD (client state: none)."""
  tx = optax.identity()
  return jax.jit(kernel_lib.make_round_kernel(
      functools.partial(models.example_losses, model.apply), tx,
      lambda params, inp: tx.init(params), microbatch=mu, lanes=lanes))


def round_jobs(cases, rounds: int, key) -> kernel_lib.Jobs:
  """Jobs ``[rounds * len(cases)]``, round-major: job ``r * C + i`` is case
  ``i`` in round ``r``, with that round's shuffle seed for its client
  (``federated.shuffle_seeds`` of ``fold_in(key, r)``)."""
  C = len(cases)
  client = jnp.asarray([c.client for c in cases] * rounds, jnp.int32)
  keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(rounds))
  seeds = jax.vmap(lambda k, ids: federated.shuffle_seeds(k, ids))(
      keys, client.reshape(rounds, C)).reshape(-1)
  tile = lambda v, dt: jnp.asarray(list(v) * rounds, dt)
  return kernel_lib.Jobs(
      client=client, exp=jnp.zeros((rounds * C,), jnp.int32),
      batch=tile([c.batch for c in cases], jnp.int32),
      steps=tile([c.steps for c in cases], jnp.int32),
      lr=jnp.full((rounds * C,), FROZEN_LR, jnp.float32),
      weight=jnp.zeros((rounds * C,), jnp.float32), seed=seeds)


def kernel_estimates(kernel, setup: Setup, cases, rounds: int, key):
  """The kernel's per-round estimates: ``(g_sq, trace, noise_steps, seeds)``
  each ``[rounds, C]``."""
  jobs = round_jobs(cases, rounds, key)
  params = jax.tree.map(lambda a: a[None], setup.params)
  out = kernel(params, setup.data, jobs, None)
  st = jax.tree.map(np.asarray, out.stats)
  shape = (rounds, len(cases))
  return (st.grad_sq.reshape(shape).astype(np.float64),
          st.trace.reshape(shape).astype(np.float64),
          st.noise_steps.reshape(shape), np.asarray(jobs.seed).reshape(shape))


def _sizes(b: int, mu: int) -> np.ndarray:
  m = -(-b // mu)
  return np.array([min(mu, b - j * mu) for j in range(m)])


@jax.jit
def _stream_rows(data, client, seeds, pos):
  """``example_rows`` for seeds ``[R, C]``, clients ``[C]``, positions
  ``[C, P]``: ``[R, C, P]``."""
  return federated.example_rows(data, client[None, :, None],
                                seeds[:, :, None], pos[None])


def local_rows(setup: Setup, cases, seeds) -> list[np.ndarray]:
  """Per case, the client-local indices ``[R, s, b]`` of the rows its steps
  read (``example_rows`` at positions ``t b + i``, mapped back to the
  client's stored order), every case in one compiled call.

  Args:
    setup: from :func:`make_setup`.
    cases: ``C`` cases.
    seeds: uint32 ``[R, C]`` shuffle seeds.
  """
  width = max(c.steps * c.batch for c in cases)
  pos = np.zeros((len(cases), width), np.int32)
  for i, c in enumerate(cases):
    pos[i, :c.steps * c.batch] = np.arange(c.steps * c.batch) % c.n
  rows = np.asarray(_stream_rows(
      setup.data, jnp.asarray([c.client for c in cases], jnp.int32),
      jnp.asarray(seeds), jnp.asarray(pos)))
  host = jax.tree.map(np.asarray, setup.data)
  out = []
  for i, c in enumerate(cases):
    own = federated.client_rows(host, c.client)
    local = np.full(host.x.shape[0], -1, np.int64)
    local[own] = np.arange(c.n)
    idx = local[rows[:, i, :c.steps * c.batch]]
    if np.any(idx < 0):
      raise AssertionError(f"example_rows left client {c.client}'s rows")
    out.append(idx.reshape(len(idx), c.steps, c.batch))
  return out


def recompute(setup: Setup, case: Case, idx: np.ndarray,
              mu: int = MU) -> dict:
  """Per-step statistics of ``case`` recomputed on the host (float64).

  The squared norm of the mean gradient of a multiset of the client's rows
  is a quadratic form in the Gram matrix of its per-example gradients.

  Args:
    setup: from :func:`make_setup`.
    case: the case.
    idx: int ``[R, s, b]`` client-local rows of each step
      (:func:`local_rows`).

  Returns:
    dict of ``[R, s]`` arrays ``small_sq``, ``big_sq``, ``g``, ``tr``
    (:func:`noise.fpc_estimates`), ``g_u``, ``tr_u``
    (:func:`noise.two_batch_estimates` at the harmonic-mean microbatch
    size), and the scalars ``c_small``, ``c_big``, ``b_small``.
  """
  b, s, n, k = case.batch, case.steps, case.n, case.client
  K = setup.gram[k]
  sizes = _sizes(b, mu)
  m = len(sizes)
  pad = m * mu - b
  idx_p = np.concatenate([idx, np.zeros(idx.shape[:-1] + (pad,), np.int64)],
                         -1).reshape(idx.shape[:-1] + (m, mu))
  mask = (np.arange(m * mu) < b).reshape(m, mu).astype(np.float64)
  blocks = K[idx_p[..., :, None], idx_p[..., None, :]]      # [R, s, m, mu, mu]
  blocks = blocks * mask[:, :, None] * mask[:, None, :]
  small = blocks.sum((-1, -2)) / sizes.astype(np.float64) ** 2
  small_sq = small.mean(-1)                                 # [R, s]
  counts = (idx[..., None] == np.arange(n)).sum(-2).astype(np.float64)
  big_sq = np.einsum("rsi,rsi->rs", counts @ K, counts) / float(b) ** 2
  c_small = float(np.mean(np.asarray(noise.fpc_coefficient(sizes, n))))
  c_big = float(noise.fpc_coefficient(b, n))
  g, tr, ok = noise.fpc_estimates(small_sq, c_small, big_sq, c_big)
  b_small = float(1.0 / np.mean(1.0 / sizes))
  g_u, tr_u = noise.two_batch_estimates(small_sq, b_small, big_sq, b)
  return dict(small_sq=small_sq, big_sq=big_sq, g=np.asarray(g, np.float64),
              tr=np.asarray(tr, np.float64), ok=np.asarray(ok),
              g_u=np.asarray(g_u, np.float64),
              tr_u=np.asarray(tr_u, np.float64), c_small=c_small,
              c_big=c_big, b_small=b_small)


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
        microbatch_sizes=_sizes(c.batch, MU).tolist(),
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


def run(*, rounds: int, seed: int = 0, epochs: int = 3, lanes: int = 16,
        chunk: int = 200):
  """Everything: setup, kernel rounds (``chunk`` rounds per call, one
  compile), host recomputation of the same steps.

  Returns:
    ``(setup, cases, g_k, tr_k, recs, mismatch)``: the kernel's per-round
    estimates ``[R, C]``, per case the :func:`recompute` dict (arrays
    ``[R, s]``), and the largest difference between a kernel per-round
    estimate and the recomputed one, relative to ``mean small_sq`` (for
    ``|G|^2``) or ``mean small_sq / c_small`` (for ``tr``).
  """
  setup = make_setup(seed=seed, epochs=epochs)
  cases = make_cases(setup)
  kernel = make_kernel(setup.model, lanes)
  key = jax.random.key(seed + 1)
  want = np.array([c.steps for c in cases])
  parts = []
  for start in range(0, rounds, chunk):
    r = min(chunk, rounds - start)
    g, t, ns, sd = kernel_estimates(kernel, setup, cases, r,
                                    jax.random.fold_in(key, start))
    if not np.all(ns == want[None, :]):
      raise AssertionError(f"noise_steps {ns[0]} != steps {want}")
    recs = [recompute(setup, c, idx)
            for c, idx in zip(cases, local_rows(setup, cases, sd))]
    parts.append((g, t, recs))
  g_k = np.concatenate([p[0] for p in parts])
  tr_k = np.concatenate([p[1] for p in parts])
  recs = [{f: (np.concatenate([p[2][i][f] for p in parts])
               if np.ndim(parts[0][2][i][f]) else parts[0][2][i][f])
           for f in parts[0][2][i]} for i in range(len(cases))]
  mismatch = 0.0
  for i, rec in enumerate(recs):
    scale = rec["small_sq"].mean()
    mismatch = max(
        mismatch,
        float(np.max(np.abs(g_k[:, i] - rec["g"].mean(-1))) / scale),
        float(np.max(np.abs(tr_k[:, i] - rec["tr"].mean(-1)))
              * rec["c_small"] / scale))
  return setup, cases, g_k, tr_k, recs, mismatch


def _versions() -> dict:
  import jaxlib  # pylint: disable=g-import-not-at-top
  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "numpy": np.__version__, "optax": optax.__version__,
          "python": platform.python_version()}


def _machine() -> dict:
  dev = jax.devices()[0]
  info = {"platform": dev.platform, "device_kind": dev.device_kind,
          "cpu_count": os.cpu_count(), "system": platform.platform()}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          info["cpu_model"] = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return info


def _commit() -> str | None:
  try:
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True,
        cwd=os.path.dirname(os.path.abspath(__file__)),
        check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None


def format_table(rows) -> str:
  head = (f"{'part':>9} {'n':>4} {'b':>4} {'B exact':>8} | corrected "
          f"{'|G|^2':>12} {'tr':>12} {'B':>12} | uncorrected {'|G|^2':>12}"
          f" {'tr':>12} {'B':>12}")
  lines = [head]
  f = lambda d, k: f"{d[k + '_ratio']:6.3f}+-{d[k + '_ratio_se']:.3f}"
  for r in rows:
    c, u = r["corrected"], r["uncorrected"]
    lines.append(
        f"{r['partition']:>9} {r['n']:>4} {r['batch']:>4} "
        f"{r['exact']['b_simple']:8.1f} |           {f(c, 'g_sq'):>12} "
        f"{f(c, 'trace'):>12} {f(c, 'b_simple'):>12} |             "
        f"{f(u, 'g_sq'):>12} {f(u, 'trace'):>12} {f(u, 'b_simple'):>12}")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true",
                 help="200 rounds instead of 10000")
  p.add_argument("--rounds", type=int, default=None)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--epochs", type=int, default=3,
                 help="epochs of plain SGD before the parameters freeze")
  p.add_argument("--out", default=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), "results"))
  a = p.parse_args(argv)
  rounds = a.rounds or (200 if a.quick else 10000)
  start = time.time()
  setup, cases, g_k, tr_k, recs, mismatch = run(rounds=rounds, seed=a.seed,
                                                epochs=a.epochs)
  rows = summarize(setup, cases, g_k, tr_k, recs)
  report = dict(
      what="noise estimates / exact values, digits MLP at a trained state, "
           "frozen parameters",
      settings=dict(dataset="digits", model="mlp", hidden=HIDDEN,
                    train=dict(optimizer="sgd", epochs=a.epochs, lr=0.1,
                               batch=32, train_accuracy=setup.train_accuracy),
                    microbatch=MU, sizes=list(SIZES),
                    partitions=dict(iid=f"partition.iid into {POOL}",
                                    dirichlet=f"partition.dirichlet alpha="
                                    f"{ALPHA} into {POOL}"),
                    client_rows="uniform n-subset of the smallest unused "
                                "pool client with >= n rows",
                    lr=FROZEN_LR, rounds=rounds, seed=a.seed,
                    acceptance="|mean - exact| <= max(0.1 |exact|, 3 se)",
                    se="over rounds (per-round estimate = mean over the "
                       "round's steps); B_simple = mean tr / mean |G|^2, "
                       "delta-method se"),
      kernel_vs_recompute_max_rel_diff=mismatch,
      summary=overall(rows),
      fields=dict(
          ratio="mean over rounds of the estimate / exact value (B_simple: "
                "mean tr / mean |G|^2 over exact B)",
          ratio_se="standard error of the ratio over rounds",
          predicted_g_sq_ratio="uncorrected: expectation from E small_sq ="
                               " |G|^2 + tr c_small, E big_sq = |G|^2 + tr "
                               "c_big (docs/method.md (a))",
          passes="|G|^2, tr and B_simple all within max(10%, 3 se)"),
      cases=rows,
      machine=_machine(), versions=_versions(), commit=_commit(),
      timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"),
      wall_s=round(time.time() - start, 1))
  os.makedirs(a.out, exist_ok=True)
  path = os.path.join(a.out, "noise_estimator.json")
  with open(path, "w") as f:
    json.dump(report, f, indent=1)
  print(format_table(rows))
  print(f"kernel vs host recomputation: max rel diff {mismatch:.2e}")
  for which, d in report["summary"].items():
    dev = ", ".join(f"{f} {v:.3f}" for f, v in
                    d["max_abs_ratio_minus_1"].items())
    print(f"{which}: all within max(10%, 3 se): {d['all_pass']}; "
          f"max |ratio - 1|: {dev}")
  print(f"wrote {path} ({report['wall_s']} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
