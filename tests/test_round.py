"""Whole rounds through the round loop against numpy hand computations
(fedjax's ``fed_avg_test.py`` style): aggregation weights -> kernel ->
algorithm state -> server optimizer -> clock, per algorithm and per server
optimizer.

The federation is built so that a round can be computed by hand: client
``k`` holds ``3 (k + 1)`` copies of one example ``(x_k, y_k)``, so every
minibatch's mean gradient is that example's gradient whatever the shuffle,
and ``local_work=epochs`` with batch 3 gives the clients 1, 2, 3 and 4
steps. The model is softmax regression.
"""

import jax
import numpy as np
import pytest

from fedjax_bsa import Config
from fedjax_bsa.core import registry
from fedjax_bsa.data.datasets import Dataset
from fedjax_bsa.run import driver

D_IN, C, N_CLIENTS = 3, 3, 4
RNG = np.random.default_rng(7)
X = RNG.normal(size=(N_CLIENTS, D_IN)).astype(np.float32)
Y = np.array([0, 2, 1, 2], np.int32)
SIZES = 3 * np.arange(1, N_CLIENTS + 1)


def _handmade(cfg):
  del cfg
  ids = np.repeat(np.arange(N_CLIENTS), SIZES).astype(np.int32)
  return Dataset("handmade", X[ids], Y[ids], X, Y, C, ids)


registry.DATASETS.register("handmade", _handmade)

BASE = Config(dataset="handmade", partition="natural", model="logreg",
              controller="constant", batch_size=3, local_work="epochs",
              local_epochs=1.0, client_lr=0.5, clients_per_round=3,
              rounds=2, eval_every=2, resources="uniform", base_speed=100.0,
              step_overhead=0.01, bandwidth=1000.0, noise_stats=False,
              progress=False, seed=3)


def _grad(w, k):
  """Softmax cross-entropy gradient of client k's example."""
  logits = X[k] @ w["kernel"] + w["bias"]
  p = np.exp(logits - logits.max())
  p /= p.sum()
  p[Y[k]] -= 1.0
  return {"kernel": np.outer(X[k], p), "bias": p}


tmap = lambda f, *t: {k: f(*(x[k] for x in t)) for k in t[0]}


def _client(w0, k, steps, cfg, pull=None):
  """Local training of client k by hand: the client optimizer, with an
  optional ``pull(w) -> extra gradient``."""
  w = dict(w0)
  m = tmap(np.zeros_like, w)
  v = tmap(np.zeros_like, w)
  for t in range(1, steps + 1):
    g = _grad(w, k)
    if pull is not None:
      g = tmap(np.add, g, pull(w))
    if cfg.client_optimizer == "adam":
      m = tmap(lambda a, b: 0.9 * a + 0.1 * b, m, g)
      v = tmap(lambda a, b: 0.999 * a + 0.001 * b * b, v, g)
      d = tmap(lambda a, b: (a / (1 - 0.9 ** t)) / (
          np.sqrt(b / (1 - 0.999 ** t)) + 1e-8), m, v)
    elif cfg.client_momentum:
      m = tmap(lambda a, b: cfg.client_momentum * a + b, m, g)
      d = m
    else:
      d = g
    w = tmap(lambda a, b: a - cfg.client_lr * b, w, d)
  return w


class _Server:
  """The server optimizers by hand, on the pseudo-gradient ``-delta``."""

  def __init__(self, cfg, w):
    self.cfg, self.t = cfg, 0
    init = 1e-6 if cfg.server_optimizer == "yogi" else 0.0
    self.m = tmap(lambda a: np.full_like(a, init), w)
    self.v = tmap(lambda a: np.full_like(a, init), w)

  def step(self, w, delta):
    cfg, lr = self.cfg, self.cfg.server_lr
    g = tmap(np.negative, delta)
    self.t += 1
    t = self.t
    if cfg.server_optimizer == "sgd":
      return tmap(lambda a, b: a - lr * b, w, g)
    if cfg.server_optimizer == "momentum":
      self.m = tmap(lambda a, b: b + cfg.server_momentum * a, self.m, g)
      return tmap(lambda a, b: a - lr * b, w, self.m)
    self.m = tmap(lambda a, b: 0.9 * a + 0.1 * b, self.m, g)
    if cfg.server_optimizer == "adam":
      self.v = tmap(lambda a, b: 0.99 * a + 0.01 * b * b, self.v, g)
    else:  # yogi
      self.v = tmap(lambda a, b: a - 0.01 * np.sign(a - b * b) * b * b,
                    self.v, g)
    return tmap(lambda a, m, v: a - lr * (m / (1 - 0.9 ** t)) / (
        np.sqrt(v / (1 - 0.99 ** t)) + 1e-3), w, self.m, self.v)


def _by_hand(cfg, w, cohorts):
  """Rounds of ``cfg.algorithm`` by hand; returns the final parameters."""
  server = _Server(cfg, w)
  N = N_CLIENTS
  c = tmap(np.zeros_like, w)                      # SCAFFOLD's c
  ck = [tmap(np.zeros_like, w) for _ in range(N)]  # and c_k
  gk = [tmap(np.zeros_like, w) for _ in range(N)]  # FedDyn's g_k
  h = tmap(np.zeros_like, w)                       # and h
  for cohort in cohorts:
    steps = {k: int(SIZES[k] // cfg.batch_size) for k in cohort}
    deltas = {}
    for k in cohort:
      pull = None
      if cfg.algorithm == "fedprox":
        pull = lambda x: tmap(lambda a, b: cfg.prox_mu * (a - b), x, w)
      elif cfg.algorithm == "scaffold":
        pull = lambda x, k=k: tmap(np.subtract, c, ck[k])
      elif cfg.algorithm == "feddyn":
        pull = lambda x, k=k: tmap(
            lambda a, b, g: cfg.feddyn_alpha * (a - b) - g, x, w, gk[k])
      deltas[k] = tmap(np.subtract, _client(w, k, steps[k], cfg, pull), w)
    if cfg.algorithm == "fednova":
      p = {k: SIZES[k] / sum(SIZES[j] for j in cohort) for k in cohort}
      tau_eff = sum(p[k] * steps[k] for k in cohort)
      coef = {k: tau_eff * p[k] / steps[k] for k in cohort}
    elif cfg.algorithm == "feddyn":
      coef = {k: 1.0 / len(cohort) for k in cohort}
    else:
      ex = {k: steps[k] * cfg.batch_size for k in cohort}
      coef = {k: ex[k] / sum(ex.values()) for k in cohort}
    delta = tmap(lambda *ds: sum(coef[k] * d for k, d in zip(cohort, ds)),
                 *[deltas[k] for k in cohort])
    if cfg.algorithm == "scaffold":
      old = [dict(x) for x in ck]
      for k in cohort:
        ck[k] = tmap(lambda a, b, d: a - b - d / (steps[k] * cfg.client_lr),
                     ck[k], c, deltas[k])
      c = tmap(lambda a, *pairs: a + sum(
          pairs[2 * i] - pairs[2 * i + 1] for i in range(len(cohort))) / N,
               c, *[x for k in cohort for x in (ck[k], old[k])])
    if cfg.algorithm == "feddyn":
      a = cfg.feddyn_alpha
      for k in cohort:
        gk[k] = tmap(lambda g, d: g - a * d, gk[k], deltas[k])
      h = tmap(lambda hh, *ds: hh - a * sum(ds) / N, h,
               *[deltas[k] for k in cohort])
      delta = tmap(lambda d, hh: d - hh / a, delta, h)
    w = server.step(w, delta)
  return w


def _through_the_loop(cfg):
  pre = driver.prepare(cfg, [{}], mesh=None)
  st0 = pre.init(pre.keys, pre.data, pre.inputs)
  w0 = jax.tree.map(lambda a: np.asarray(a[0], np.float64),
                    st0.params["Dense_0"])
  st, m = pre.run_chunk(st0, pre.data, pre.inputs, np.int32(cfg.rounds))
  w = jax.tree.map(lambda a: np.asarray(a[0]), st.params["Dense_0"])
  return w0, w, jax.tree.map(lambda a: np.asarray(a[0]), m)


CASES = [
    dict(algorithm="fedavg"),
    dict(algorithm="fedavg", client_momentum=0.9),
    dict(algorithm="fedavg", client_optimizer="adam", client_lr=0.05),
    dict(algorithm="fedprox", prox_mu=0.5),
    dict(algorithm="fednova"),
    dict(algorithm="scaffold", client_lr=0.2),
    dict(algorithm="feddyn", feddyn_alpha=0.1, client_lr=0.2, rounds=3),
    dict(algorithm="fedavg", server_optimizer="sgd", server_lr=0.7),
    dict(algorithm="fedavg", server_optimizer="momentum", server_lr=0.5),
    dict(algorithm="fedavg", server_optimizer="adam", server_lr=0.1),
    dict(algorithm="fedavg", server_optimizer="yogi", server_lr=0.1),
]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(
    f"{k}={v}" for k, v in kw.items()))
def test_two_rounds_equal_hand_computation(kw):
  cfg = BASE.replace(**kw)
  w0, w, m = _through_the_loop(cfg)
  cohorts = [list(c) for c in m.cohort]
  want = _by_hand(cfg, w0, cohorts)
  for name in ("kernel", "bias"):
    np.testing.assert_allclose(w[name], want[name], rtol=2e-4, atol=2e-6,
                               err_msg=name)
  # and the run moved: a test that cannot fail would not
  assert np.abs(w["kernel"] - w0["kernel"]).max() > 1e-3


def test_round_time_and_weights_wiring():
  """Steps from the epochs protocol, and the clock: the round lasts as
  long as its slowest client's ``s (o + b / v)`` plus the model's trip
  down and up."""
  cfg = BASE.replace(rounds=2)
  _, _, m = _through_the_loop(cfg)
  model_bytes = 4 * (D_IN * C + C)
  for r in range(2):
    cohort = m.cohort[r]
    steps = SIZES[cohort] // 3
    np.testing.assert_array_equal(m.steps[r], steps)
    slowest = max(steps) * (0.01 + 3 / 100.0) + 2 * model_bytes / 1000.0
    np.testing.assert_allclose(m.round_time_s[r], slowest, rtol=1e-5)
  np.testing.assert_allclose(m.sim_time_s[1], m.round_time_s.sum(), rtol=1e-5)
