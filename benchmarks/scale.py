"""Scale benchmark: FedAvg on a 100,000-client quantity-skewed federation.

  python -m benchmarks.scale [--clients N] [--cohorts 100,1000,10000]
                             [--rounds R] [--variants V,...] [--quick]
                             [--out DIR]

Workload (all seeded):

* **Data**: a Synthetic-like generator (:func:`make_federation`), cheap at
  any ``N``: no Python loop over clients, the rows drawn on the device in
  chunks of at most 2^18 rows written in place (peak memory: the data and
  one chunk).
  Client sizes are quantity-skewed,
  :func:`fedjax_bsa.data.federated.lognormal_sizes` with ``sigma = 2``
  (``min_examples = 8`` each, the rest in proportion to ``lognormal(0, 2)``
  weights; 20 per client on average). Client ``k`` draws
  ``x ~ N(v_k, diag(j^-1.2))`` with ``v_k ~ N(B_k, I)``, ``B_k ~ N(0,
  beta^2)``, ``beta = 1`` (FedProx's Synthetic feature skew, Li et al.
  MLSys 2020), and labels ``y = argmax(W^T x + c_k)`` from a teacher
  ``W ~ N(0, I)`` shared by all clients plus a per-client bias
  ``c_k ~ N(0, I)`` (FedProx draws a whole ``W_k`` per client: ``N x C x d``
  floats, too many at a million clients). 60 features, 10 classes. The
  test set (10,000 rows) is drawn the same way from clients picked in
  proportion to their size. Rows are stored client-major, once
  (:class:`~fedjax_bsa.data.federated.FederatedData` with identity
  ``rows``).
* **Run**: logistic regression, FedAvg (``controller=constant``, batch 8,
  microbatch 8, ``local_work=epochs``, one epoch: ``ceil(n_k / 8)`` steps),
  plain SGD (client lr 0.1, server lr 1), ``noise_stats`` off,
  ``lognormal`` resources, the library's default lanes; one
  :func:`fedjax_bsa.run.simulate.make_simulation` per cohort and variant, its
  :class:`~fedjax_bsa.setup.experiment.Experiment` built directly (no partition
  lists), jitted with ``chunk = 1`` so every round is timed on its own.
* **Variants** (``--variants``): each gives the round loop its cohort
  sampler as an argument (``make_simulation(sampler=...)``, see
  :data:`SAMPLERS`; nothing else changes, nothing is patched): ``library``
  gives it the library's own function,
  :func:`fedjax_bsa.run.simulate.sample_cohort` (the test checks that its
  rounds draw the cohorts the library's simulation draws); ``choice``,
  ``topk`` and ``permute`` are what-ifs; a ``-steps`` suffix runs
  ``LOCAL_STEPS = 3`` steps per client instead of one epoch (equal jobs: no
  straggler). Variants of a cohort run one round each in turn, so machine
  noise hits them alike.

Measured per cohort ``K`` and variant: compile time (``lower + compile``,
excluded from the rounds), the compiled round's ``memory_analysis()``, then
``--warmup`` rounds untimed and ``--rounds`` rounds each timed to
``jax.block_until_ready``; the median and spread of the round time, of the
examples processed (``sum_k b_k s_k``, checked against the protocol on the
host: ``examples_equal_protocol``) and of the data examples (``sum_k n_k``
over the cohort), useful examples per second, the kernel's padding
efficiency, and the **cost ratio**: ``median(time_r / examples_r)`` over
rounds, relative to the largest cohort's (target: within 1.3x of linear),
split into the part lane imbalance explains (``imbalance_ratio``, from the
padding efficiencies) and the rest (``overhead_ratio``). Also: the
process's peak RSS, the device's peak bytes (accelerators), device bytes of
the data (the ``FederatedData`` arrays' nbytes against raw ``x + y``), test
accuracy before and after.

At the largest cohort, where a ``library`` round's time goes (each piece
jitted alone on the same shapes, median of repeats): cohort sampling (the
library's :func:`fedjax_bsa.run.simulate.sample_cohort`, the ``K`` largest of
``N`` uniform keys), the plan (:func:`fedjax_bsa.plans.plan_round`), the
shuffle seeds, the lane layout (:func:`fedjax_bsa.kernel.layout.make_layout`,
whose :func:`~fedjax_bsa.kernel.layout.pack_lanes` is a sequential ``lax.scan``
over the jobs), the kernel (layout plus slot loop), and the rest (metrics,
server update) as the round minus those (noisy: the pieces are timed
apart). Alternatives are timed beside them: the ``choice`` (a permutation
of all ``N``: a sort; the library's sampler before top-k), ``topk`` and
``permute`` samplers and :func:`waterfill_pack_lanes` (no sequential
loop), with its makespan beside ``pack_lanes``'s and the lower bound
``max(p_max, ceil(sum / L))``.

With ``--prepare-path`` (default: when ``N <= 100,000``) the library's
config route is also timed stage by stage on the same rows
(``partition=quantity``, ``quantity_sigma=2``): the partition lists, the
resources, ``from_partition``, ``merge`` and the whole
:func:`fedjax_bsa.run.driver.prepare`, with the Python heap's peak
(``tracemalloc``, in a second, untimed run) of each stage.

``--quick``: 10,000 clients, cohorts 10 and 100, 3 rounds, ``library``.
Writes ``scale_<machine>.json`` (``--quick``: ``scale_<machine>_quick.json``)
into ``--out`` (default ``benchmarks/results``), at the end only.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import resource
import sys
import time
import tracemalloc
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_bsa import algorithms
from fedjax_bsa import kernel as kernel_lib
from fedjax_bsa import plans
from fedjax_bsa.bench import harness
from fedjax_bsa.core import config as config_lib
from fedjax_bsa.core.config import Config
from fedjax_bsa.data import datasets
from fedjax_bsa.data import federated
from fedjax_bsa.kernel import layout as layout_lib
from fedjax_bsa.plans import clock
from fedjax_bsa.plans import controllers
from fedjax_bsa.run import simulate
from fedjax_bsa.setup import experiment as experiment_lib
from fedjax_bsa.setup import models

__all__ = ["Federation", "make_federation", "make_config", "make_run",
           "data_bytes", "waterfill_pack_lanes", "SAMPLERS", "sample_cohort",
           "cohort_sampler", "bench_cohort", "main"]

SIGMA = 2.0
MEAN_EXAMPLES = 20
MIN_EXAMPLES = 8
NUM_FEATURES = 60
NUM_CLASSES = 10
BATCH = 8
MICROBATCH = 8
CLIENT_LR = 0.1
LOCAL_STEPS = 3  # the steps protocol: 24 examples per client, about
# what one epoch of batch 8 costs on average here
TEST_EXAMPLES = 10_000
TARGET_RATIO = 1.3


# ------------------------------------------------------------------ data


class Federation(NamedTuple):
  """A generated federation, its data on the default device."""
  data: federated.FederatedData  # device arrays; rows client-major
  x_test: jax.Array              # float32 [T_test, d]
  y_test: jax.Array              # int32 [T_test]
  sizes: np.ndarray              # int64 [N], host copy of num_examples
  num_classes: int


@functools.partial(jax.jit, static_argnames=("num_clients", "width"))
def _client_draws(key, *, num_clients: int, width: int):
  """Per-client standard normals ``[N, width]`` (one random draw: each
  ``jax.random`` draw in a program adds about a second of XLA compile on a
  CPU)."""
  return jax.random.normal(key, (num_clients, width))


def _draw(key, cid, p, w, beta):
  """``(x, y)`` of rows owned by clients ``cid`` (int32 ``[R]``), from the
  client draws ``p`` ``[N, 1 + d + C]`` and the teacher ``w`` ``[d, C]``."""
  d = w.shape[0]
  v = beta * p[:, :1] + p[:, 1:1 + d]           # v_k ~ N(B_k, I)
  bias = p[:, 1 + d:]                           # c_k ~ N(0, I)
  std = jnp.arange(1, d + 1, dtype=jnp.float32) ** -0.6  # sqrt(j^-1.2)
  x = v[cid] + std * jax.random.normal(key, (cid.shape[0], d))
  return x, jnp.argmax(x @ w + bias[cid], axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _fill(x, y, start, key, cid, p, w, beta):
  """Draws rows ``start ... start + len(cid) - 1`` into ``(x, y)`` in place
  (donated buffers: peak memory is the data plus one chunk)."""
  xc, yc = _draw(key, cid, p, w, beta)
  return (jax.lax.dynamic_update_slice(x, xc, (start, 0)),
          jax.lax.dynamic_update_slice(y, yc, (start,)))


def _chunk_rows(total: int, most: int = 2**18) -> int:
  """The largest divisor of ``total`` up to ``most`` (``total`` itself when
  that divisor is below ``most / 16``)."""
  for c in range(min(total, most), 0, -1):
    if total % c == 0:
      return c if c >= min(total, most) // 16 else total
  return total


def make_federation(num_clients: int, *, mean_examples: int = MEAN_EXAMPLES,
                    min_examples: int = MIN_EXAMPLES, sigma: float = SIGMA,
                    num_features: int = NUM_FEATURES,
                    num_classes: int = NUM_CLASSES, beta: float = 1.0,
                    test_examples: int = TEST_EXAMPLES,
                    seed: int = 0) -> Federation:
  """A quantity-skewed Synthetic-like federation (see the module docstring).

  Args:
    num_clients: ``N >= 1``.
    mean_examples: training examples per client on average
      (``T = N * mean_examples`` in all).
    min_examples: fewest examples per client, ``<= mean_examples``.
    sigma: lognormal sigma of the client-size weights.
    num_features: ``d``.
    num_classes: ``C >= 2``.
    beta: spread of the clients' feature means (FedProx's beta).
    test_examples: size of the test set.
    seed: the seed of sizes and data.

  Returns:
    A :class:`Federation`: ``data.x`` float32 ``[T, d]``, ``data.y`` int32
    ``[T]``, ``data.rows = arange(T)``, client ``k`` owning rows
    ``offset[k] ... offset[k] + n_k - 1``.

  >>> fed = make_federation(50, mean_examples=10, min_examples=2, seed=0)
  >>> int(fed.sizes.sum()), fed.data.x.shape, fed.sizes.min()
  (500, (500, 60), np.int64(2))
  >>> int(fed.data.offset[1]) == int(fed.sizes[0])
  True
  """
  if num_classes < 2:
    raise ValueError(f"num_classes={num_classes} is out of range: >= 2")
  total = int(num_clients) * int(mean_examples)
  sizes = federated.lognormal_sizes(total, num_clients, sigma, seed,
                                    min_examples)
  rng = np.random.default_rng([seed, 1])
  cid = np.repeat(np.arange(num_clients, dtype=np.int32), sizes)
  # test clients in proportion to their size: the owners of random rows
  test_cid = cid[rng.integers(0, total, int(test_examples))]
  w = rng.standard_normal((int(num_features), int(num_classes)),
                          dtype=np.float32)
  k_client, k_train, k_test = jax.random.split(jax.random.key(seed), 3)
  p = _client_draws(k_client, num_clients=int(num_clients),
                    width=1 + int(num_features) + int(num_classes))
  beta = np.float32(beta)
  x = jnp.zeros((total, int(num_features)), jnp.float32)
  y = jnp.zeros((total,), jnp.int32)
  chunk = _chunk_rows(total)
  keys = jax.random.split(k_train, total // chunk)
  for i in range(total // chunk):  # a few chunks, never a loop over clients
    x, y = _fill(x, y, np.int32(i * chunk), keys[i],
                 cid[i * chunk:(i + 1) * chunk], p, w, beta)
  x_t, y_t = jax.jit(_draw)(k_test, test_cid, p, w, beta)
  offset = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
  data = federated.FederatedData(
      x, y, jnp.arange(total, dtype=jnp.int32), jnp.asarray(offset),
      jnp.asarray(sizes, jnp.int32))
  return Federation(data, x_t, y_t, sizes, int(num_classes))


def data_bytes(data: federated.FederatedData) -> dict:
  """Bytes of the data's arrays: ``total`` (their nbytes), ``raw`` (``x``
  and ``y``), ``per_row`` (``rows``) and ``per_client`` (``offset``,
  ``num_examples``)."""
  nb = lambda a: int(a.size) * a.dtype.itemsize
  raw = nb(data.x) + nb(data.y)
  per_client = nb(data.offset) + nb(data.num_examples)
  return {"total": raw + nb(data.rows) + per_client, "raw": raw,
          "per_row": nb(data.rows), "per_client": per_client}


class _Parts:
  """The partition as a lazy sequence: client ``k``'s row ids on demand
  (``Experiment.parts`` without ``N`` index arrays)."""

  def __init__(self, sizes: np.ndarray):
    self._sizes = sizes
    self._offset = np.concatenate([[0], np.cumsum(sizes)[:-1]])

  def __len__(self) -> int:
    return len(self._sizes)

  def __getitem__(self, k: int) -> np.ndarray:
    return np.arange(self._offset[k], self._offset[k] + self._sizes[k])


def make_config(num_clients: int, cohort: int, *, rounds: int = 10,
                model: str = "logreg", hidden: int = 32,
                client_lr: float = CLIENT_LR, noise_stats: bool = False,
                lanes: int = 0, seed: int = 0, **changes) -> Config:
  """The benchmark's settings: FedAvg, constant batch 8 for one epoch
  (``changes``: any other :class:`~fedjax_bsa.core.config.Config` settings, e.g.
  ``local_work="steps"``)."""
  return Config(
      dataset="synthetic", num_clients=num_clients, clients_per_round=cohort,
      partition="quantity", quantity_sigma=SIGMA, min_examples=MIN_EXAMPLES,
      model=model, hidden=hidden, rounds=rounds, algorithm="fedavg",
      client_optimizer="sgd", client_lr=client_lr, server_optimizer="sgd",
      server_lr=1.0, controller="constant", batch_size=BATCH,
      local_work="epochs", local_epochs=1.0, microbatch=MICROBATCH,
      lanes=lanes, noise_stats=noise_stats, resources="lognormal", seed=seed,
      eval_every=1, progress=False).replace(**changes)


class Run(NamedTuple):
  """One experiment on a federation, ready for :mod:`fedjax_bsa.run.simulate`."""
  exp: experiment_lib.Experiment
  inputs: simulate.Inputs  # leaves [1, ...], on device


def make_run(cfg: Config, fed: Federation) -> Run:
  """The :class:`~fedjax_bsa.setup.experiment.Experiment` and inputs of ``cfg``
  on ``fed``, built directly: the clients are the generator's own (no
  registered partition reproduces them) and no ``N`` index arrays are made;
  ``--prepare-path`` times the config route on the same rows."""
  n = len(fed.sizes)
  if cfg.num_clients != n:
    raise ValueError(f"num_clients={cfg.num_clients} but the federation has "
                     f"{n} clients")
  ds = datasets.Dataset("scale_synthetic", fed.data.x, fed.data.y,
                        fed.x_test, fed.y_test, fed.num_classes, None)
  model = models.make_model(cfg.model, fed.data.x.shape[1:], fed.num_classes,
                            hidden=cfg.hidden)
  res = experiment_lib.make_resources(cfg, n)
  params = jax.eval_shape(model.init, jax.random.key(0))
  exp = experiment_lib.Experiment(cfg, ds, _Parts(fed.sizes), res, model,
                                  algorithms.make_algorithm(cfg),
                                  clock.model_bytes(params))
  hp = config_lib.hparams(cfg, experiment_lib.reference_speed(res))
  one = simulate.Inputs(res, hp, np.int32(0),
                        np.asarray(fed.sizes, np.int32))
  inputs = jax.device_put(jax.tree.map(lambda a: np.asarray(a)[None], one))
  return Run(exp, inputs)


# --------------------------------------------------------------- helpers


def _stats(values) -> dict:
  """Median, quartiles, min and max of a sample."""
  v = np.asarray(values, np.float64)
  q = np.percentile(v, [0, 25, 50, 75, 100])
  return {"median": float(q[2]), "p25": float(q[1]), "p75": float(q[3]),
          "min": float(q[0]), "max": float(q[4]), "n": int(v.size)}


def _rss_bytes() -> int:
  """Peak resident set size of this process so far (bytes)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_now() -> int | None:
  """Resident set size of this process now (bytes; Linux)."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except (OSError, ValueError):
    return None


def _device_peak() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def _loadavg():
  try:
    return [round(v, 2) for v in os.getloadavg()]
  except OSError:
    return None


def _memory(compiled) -> dict | None:
  """XLA's ``memory_analysis()`` of a compiled function (bytes)."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in
         ("argument", "output", "temp", "alias", "generated_code")
         if hasattr(m, f"{k}_size_in_bytes")}
  out["total"] = (out.get("argument", 0) + out.get("output", 0)
                  + out.get("temp", 0) - out.get("alias", 0))
  return out


def _time(fn, *args, repeats: int = 7) -> float:
  """Median seconds of ``fn(*args)`` (jitted, compiled by a first call)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def _machine() -> dict:
  import jaxlib  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  info = {"name": harness.machine_name(), "platform": dev.platform,
          "device_kind": dev.device_kind, "devices": jax.device_count(),
          "cpu_count": os.cpu_count(), "system": platform.platform(),
          "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
                       "numpy": np.__version__,
                       "python": platform.python_version()}}
  model = harness.cpu_model()
  if model is not None:
    info["cpu_model"] = model
  return info


def log(*a) -> None:
  print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- packing


def waterfill_pack_lanes(slots: jax.Array, lanes: int):
  """A packing with no sequential loop (a proposed fast path for
  :func:`fedjax_bsa.kernel.layout.pack_lanes`, whose ``lax.scan`` takes ``J``
  steps of ``O(L)`` each).

  The ``L`` longest jobs get a lane each (as LPT places them); the others,
  longest first, are poured into the lanes up to the common level ``H``
  that their total work reaches (water-filling: ``sum_l max(0, H - load_l)``
  equals it): laid end to end, each job goes to the lane whose share of
  the level holds the job's midpoint (a ``searchsorted``). A sort, prefix
  sums and segment sums: ``O(J log J)`` work and ``O(log J)`` depth. A lane
  overshoots ``H`` by at most one of the non-longest jobs, each at most
  half the optimal makespan when ``J > L`` (two of the ``L + 1`` longest
  share a lane in any packing), so the makespan is at most
  ``max(p_1, H + OPT / 2)``.

  Args:
    slots: int32 ``[J]`` slots each job needs (0: not packed).
    lanes: ``L``.

  Returns:
    ``(lane, start, load)`` as :func:`fedjax_bsa.kernel.layout.pack_lanes`.

  >>> lane, start, load = waterfill_pack_lanes(jnp.array([5, 0, 9, 3]), 2)
  >>> lane.tolist(), start.tolist(), load.tolist()
  ([1, 2, 0, 1], [0, 0, 0, 5], [9, 8])
  """
  slots = jnp.asarray(slots, jnp.int32)
  n_jobs, n_lanes = slots.shape[0], int(lanes)
  top = min(n_jobs, n_lanes)
  f32 = jnp.float32
  order = jnp.argsort(-slots, stable=True).astype(jnp.int32)
  s = slots[order]
  load0 = jnp.zeros((n_lanes,), jnp.int32).at[:top].set(s[:top])
  rest = s[top:]
  # water level: the lowest lanes 0..i (ascending) filled to level[i]; the
  # first level not above the next lane's load is the one
  asc = jnp.sort(load0).astype(f32)
  level = (rest.sum().astype(f32) + jnp.cumsum(asc)) / jnp.arange(
      1, n_lanes + 1, dtype=f32)
  above = jnp.concatenate([asc[1:], jnp.full((1,), jnp.inf, f32)])
  h = level[jnp.argmax(level <= above)]
  share_end = jnp.cumsum(jnp.maximum(h - load0.astype(f32), 0.0))
  before = jnp.cumsum(rest) - rest
  mid = before.astype(f32) + 0.5 * rest.astype(f32)
  lane_r = jnp.minimum(jnp.searchsorted(share_end, mid, side="right"),
                       n_lanes - 1).astype(jnp.int32)
  first = jax.ops.segment_min(before, lane_r, n_lanes)
  start_r = load0[lane_r] + before - first[lane_r]
  load = load0 + jax.ops.segment_sum(rest, lane_r, n_lanes)
  lane_o = jnp.concatenate([jnp.arange(top, dtype=jnp.int32), lane_r])
  start_o = jnp.concatenate([jnp.zeros((top,), jnp.int32), start_r])
  lane = jnp.zeros((n_jobs,), jnp.int32).at[order].set(lane_o)
  start = jnp.zeros((n_jobs,), jnp.int32).at[order].set(start_o)
  busy = slots > 0
  return (jnp.where(busy, lane, n_lanes), jnp.where(busy, start, 0),
          load.astype(jnp.int32))


# -------------------------------------------------------------- benchmark


def _init(sim, fed: Federation, run: Run, seed: int):
  keys = jax.random.split(jax.random.key(seed), 1)
  return jax.jit(sim.init)(keys, fed.data, run.inputs)


def _choice(key, num_clients: int, cohort: int):
  """``jax.random.choice(..., replace=False)``: a permutation of all ``N``
  (a sort; the library's sampler before top-k)."""
  return jax.random.choice(key, num_clients, (cohort,),
                           replace=False).astype(jnp.int32)


def _topk(key, num_clients: int, cohort: int):
  """The indices of the ``K`` largest of ``N`` uniform keys (exactly
  uniform, ``O(N)``, no sort), written here apart from the library's."""
  return jax.lax.top_k(jax.random.uniform(key, (num_clients,)),
                       cohort)[1].astype(jnp.int32)


def _permute(key, num_clients: int, cohort: int):
  """The first ``K`` images of the swap-or-not bijection
  :func:`fedjax_bsa.data.federated.permute` (``O(K)``, uniform only as far
  as that cipher mixes)."""
  return federated.permute(jax.random.bits(key, (), jnp.uint32),
                           jnp.arange(cohort, dtype=jnp.int32), num_clients)


#: Variant -> the cohort sampler ``(key, N, K) -> int32 [K]`` the round loop
#: is given. ``library`` is the library's own function object,
#: :func:`fedjax_bsa.run.simulate.sample_cohort` (what
#: ``make_simulation`` draws with when given no sampler); the others are
#: what-ifs.
SAMPLERS = {"library": simulate.sample_cohort, "choice": _choice,
            "topk": _topk, "permute": _permute}


def cohort_sampler(kind: str):
  """The cohort sampler of variant ``kind`` (:data:`SAMPLERS`), passed to
  ``simulate.make_simulation(sampler=...)``.

  >>> cohort_sampler("library") is simulate.sample_cohort
  True
  """
  if kind not in SAMPLERS:
    raise ValueError(f"sampler={kind!r} is not allowed: one of "
                     f"{tuple(SAMPLERS)}")
  return SAMPLERS[kind]


def sample_cohort(kind: str, key, num_clients: int, cohort: int):
  """``cohort`` distinct clients of ``range(num_clients)``, drawn by the
  sampler of variant ``kind`` (:func:`cohort_sampler`).

  >>> c = sample_cohort("topk", jax.random.key(0), 10, 4)
  >>> len(set(c.tolist())), bool((c >= 0).all() & (c < 10).all())
  (4, True)
  """
  return cohort_sampler(kind)(key, num_clients, cohort)


class _Timed:
  """One variant at one cohort: compiled round, state and samples
  (``cohorts``: each recorded round's cohort)."""

  def __init__(self, fed: Federation, cohort: int, sampler: str, seed: int,
               rounds: int, cfg_kw: dict):
    self.sampler = sampler
    self.sample = cohort_sampler(sampler)  # what the round loop draws with
    cfg = make_config(len(fed.sizes), cohort, rounds=rounds, seed=seed,
                      **cfg_kw)
    t = time.perf_counter()
    run = make_run(cfg, fed)
    sim = simulate.make_simulation(run.exp, 1, chunk=1, sampler=self.sample)
    self.state = _init(sim, fed, run, seed)
    self.build_s = time.perf_counter() - t
    t = time.perf_counter()
    lowered = jax.jit(sim.run_chunk).lower(self.state, fed.data, run.inputs,
                                           np.int32(1))
    self.compiled = lowered.compile()
    self.compile_s = time.perf_counter() - t
    self.cfg, self.run, self.sim, self.fed = cfg, run, sim, fed
    self.evaluate = jax.jit(sim.evaluate)
    self.acc = [self.accuracy()]
    self.times, self.planned, self.owned, self.eff = [], [], [], []
    self.expected, self.cohorts = [], []
    self.first_s = None

  def accuracy(self) -> tuple[float, float]:
    out = self.evaluate(self.state.params, self.fed.x_test[None],
                        self.fed.y_test[None])
    return tuple(float(a[0]) for a in out)

  def step(self, record: bool) -> None:
    t = time.perf_counter()
    self.state, m = self.compiled(self.state, self.fed.data, self.run.inputs,
                                  np.int32(1))
    jax.block_until_ready((self.state, m))
    dt = time.perf_counter() - t
    if self.first_s is None:
      self.first_s = dt
    if record:
      m = jax.device_get(m)
      self.times.append(dt)
      self.planned.append(int(m.examples[0, 0]))
      self.cohorts.append(np.asarray(m.cohort[0, 0]))
      n = self.fed.sizes[self.cohorts[-1]]
      self.owned.append(int(n.sum()))
      b = self.cfg.batch_size  # constant controller, memory cap above it
      s = (-(-n // b) if self.cfg.local_work == "epochs"
           else np.full_like(n, self.cfg.local_steps))
      self.expected.append(int((b * s).sum()))
      self.eff.append(float(m.padding_efficiency[0, 0]))

  def result(self, warmup: int) -> dict:
    self.acc.append(self.accuracy())
    times, planned = np.array(self.times), np.array(self.planned, float)
    # the kernel's trip count: loop iterations of the fullest lane (each
    # iteration computes per_slot microbatches of mu rows on every lane)
    steps = planned / (np.array(self.eff) * self.sim.microbatch *
                       self.sim.per_slot * self.sim.lanes)
    return {
        "cohort": self.cfg.clients_per_round, "sampler": self.sampler,
        "local_work": self.cfg.local_work, "lanes": self.sim.lanes,
        "rounds": len(times), "warmup": warmup, "build_s": self.build_s,
        "compile_s": self.compile_s, "first_round_s": self.first_s,
        "compiles": len(self.sim.traces),
        "time_per_round_s": _stats(times),
        "examples_per_round": _stats(planned),
        "examples_equal_protocol": bool(np.array_equal(planned,
                                                       self.expected)),
        "data_examples_per_round": _stats(self.owned),
        "useful_examples_per_s": _stats(planned / times),
        "cost_s_per_example": _stats(times / planned),
        "padding_efficiency": _stats(self.eff),
        "slot_steps_per_round": _stats(steps),
        "time_per_slot_step_s": _stats(times / steps),
        "compiled_round_bytes": _memory(self.compiled),
        "per_round": {"time_s": times.tolist(),
                      "slot_steps": np.rint(steps).astype(int).tolist(),
                      "examples": planned.astype(int).tolist()},
        "test_accuracy": [a for a, _ in self.acc],
        "test_loss": [l for _, l in self.acc],
        "peak_rss_bytes": _rss_bytes(), "rss_bytes": _rss_now(),
        "device_peak_bytes": _device_peak()}


def bench_cohort(fed: Federation, cohort: int, variants: dict, *,
                 rounds: int, warmup: int, seed: int = 0, **cfg_kw
                 ) -> tuple[dict, Any]:
  """Times ``rounds`` rounds of cohort ``cohort`` after ``warmup`` for each
  variant, one round of each in turn (so machine noise hits them alike).

  Args:
    fed: the federation.
    cohort: ``K``.
    variants: ``{name: (sampler, local_work)}``, sampler a key of
      :data:`SAMPLERS`.
    rounds: timed rounds.
    warmup: untimed rounds first.
    seed: the run's seed.
    **cfg_kw: more :func:`make_config` settings.

  Returns:
    ``({name: result}, context)``: JSON-able results and, for the first
    ``library`` variant, what :func:`profile_round` needs (config, run,
    simulation, state); None if there is none.
  """
  timed = {}
  for name, (sampler, local_work) in variants.items():
    timed[name] = _Timed(fed, cohort, sampler, seed, warmup + rounds,
                         dict(cfg_kw, local_work=local_work))
  for r in range(warmup + rounds):
    for t in timed.values():
      t.step(record=r >= warmup)
  lib = next((t for t in timed.values() if t.sampler == "library"), None)
  ctx = None if lib is None else (lib.cfg, lib.run, lib.sim, lib.state)
  return {name: t.result(warmup) for name, t in timed.items()}, ctx


def profile_round(fed: Federation, cfg: Config, run: Run, sim, state,
                  round_s: float, seed: int = 0) -> dict:
  """Where a round's time goes (see the module docstring), in seconds."""
  n, k = len(fed.sizes), cfg.clients_per_round
  exp, alg = run.exp, run.exp.algorithm
  one = lambda t: jax.tree.map(lambda a: a[0], t)
  hp, res, n_all = one(run.inputs.hparams), one(run.inputs.resources), one(
      run.inputs.num_examples)
  st = one(state)
  key = jax.random.key(seed + 1)
  out = {}

  sample = jax.jit(lambda kk: cohort_sampler("library")(kk, n, k))
  out["sample_library"] = _time(sample, key)
  for kind in ("choice", "topk", "permute"):
    out[f"sample_{kind}"] = _time(
        jax.jit(cohort_sampler(kind), static_argnums=(1, 2)), key, n, k)
  cohort = sample(key).astype(jnp.int32)

  def plan(kk, cohort, st, res, hp, n_all):
    k_avail, k_plan = jax.random.split(kk)
    rc = jax.tree.map(lambda a: a[cohort], res)
    nk = n_all[cohort]
    ctx = controllers.Context(st.round, cohort, rc.speed, rc.step_overhead,
                              rc.memory_cap, k_plan, nk)
    available = clock.sample_available(k_avail, rc.availability)
    rp, _ = plans.plan_round(cfg, hp, plans.make_controller(cfg, hp),
                             st.feedback, st.ctrl_state, ctx, rc, available,
                             exp.model_bytes)
    p = rp.plan
    return p, alg.weights(p.batch_size * p.steps, p.steps, nk, hp, p.lr)

  plan_j = jax.jit(plan)
  out["plan"] = _time(plan_j, key, cohort, st, res, hp, n_all)
  p, weights = plan_j(key, cohort, st, res, hp, n_all)
  seeds_j = jax.jit(federated.shuffle_seeds)
  out["shuffle_seeds"] = _time(seeds_j, key, cohort)
  seeds = seeds_j(key, cohort)

  lanes = sim.lanes
  slots = p.steps * layout_lib.slots_per_step(p.batch_size, sim.microbatch,
                                              sim.per_slot)
  out["pack_lanes"] = _time(jax.jit(layout_lib.pack_lanes,
                                    static_argnums=1), slots, lanes)
  out["make_layout"] = _time(jax.jit(layout_lib.make_layout,
                                     static_argnums=1), slots, lanes)
  fill = jax.jit(waterfill_pack_lanes, static_argnums=1)
  out["waterfill_pack_lanes_proposed"] = _time(fill, slots, lanes)
  lpt_load = layout_lib.pack_lanes(slots, lanes)[2]
  fill_load = fill(slots, lanes)[2]
  total_slots = int(slots.sum())

  loss_fn = functools.partial(models.example_losses, exp.model.apply)
  kern = kernel_lib.make_round_kernel(
      loss_fn, alg.client_tx, alg.client_init, microbatch=sim.microbatch,
      lanes=lanes, per_slot=sim.per_slot, num_experiments=1,
      noise_stats=cfg.noise_stats,
      client_deltas=alg.client_deltas)
  jobs = kernel_lib.Jobs(cohort, jnp.zeros((k,), jnp.int32), p.batch_size,
                         p.steps, p.lr, weights, seeds)
  cin = alg.client_inputs(st.alg_state, cohort, hp)
  out["kernel"] = _time(jax.jit(kern), state.params, fed.data, jobs, cin,
                        repeats=5)
  out["kernel_slot_loop"] = out["kernel"] - out["make_layout"]
  out["round"] = round_s
  out["rest"] = round_s - (out["sample_library"] + out["plan"]
                           + out["shuffle_seeds"] + out["kernel"])
  return {"seconds": out, "cohort": k, "lanes": lanes,
          "slots_total": total_slots,
          "makespan_pack_lanes": int(lpt_load.max()),
          "makespan_waterfill_proposed": int(fill_load.max()),
          "makespan_lower_bound": int(max(int(slots.max()),
                                          -(-total_slots // lanes)))}


# ---------------------------------------------------- the library's route


_HELD = {}


@functools.lru_cache(maxsize=None)
def _register_dataset() -> None:
  from fedjax_bsa.core import registry  # pylint: disable=g-import-not-at-top
  registry.DATASETS.register("scale_synthetic", lambda cfg: _HELD["ds"])


def _stage(out: dict, name: str, fn, *args):
  """Runs ``fn(*args)`` twice: timed, then under ``tracemalloc`` (which slows
  allocations down) for the Python heap's peak."""
  t = time.perf_counter()
  value = fn(*args)
  seconds = time.perf_counter() - t
  del value
  tracemalloc.start()
  value = fn(*args)
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  out[name] = {"s": seconds, "heap_peak_bytes": int(peak)}
  log(f"  {name}: {seconds:.2f} s, heap peak {peak / 2**20:.0f} MiB")
  return value


def prepare_path(fed: Federation, cohort: int) -> dict:
  """Times the config route (``driver.prepare``) stage by stage on ``fed``'s
  rows, split by ``partition=quantity`` (lognormal sigma 2)."""
  from fedjax_bsa.run import driver  # pylint: disable=g-import-not-at-top
  n = len(fed.sizes)
  ds = datasets.Dataset("scale_synthetic", np.asarray(fed.data.x),
                        np.asarray(fed.data.y), np.asarray(fed.x_test),
                        np.asarray(fed.y_test), fed.num_classes, None)
  _HELD["ds"] = ds
  _register_dataset()
  cfg = make_config(n, cohort).replace(dataset="scale_synthetic")
  out = {"num_clients": n}
  parts = _stage(out, "experiment.make_parts (partition.quantity)",
                 experiment_lib.make_parts, cfg, ds)
  _stage(out, "experiment.make_resources", experiment_lib.make_resources,
         cfg, n)
  _stage(out, "experiment.build", experiment_lib.build, cfg, ds)
  _stage(out, "driver._host_inputs sizes ([len(p) for p in parts])",
         lambda: np.array([len(q) for q in parts], np.int32))
  fd = _stage(out, "federated.from_partition", federated.from_partition,
              ds.x_train, ds.y_train, parts)
  _stage(out, "federated.merge", federated.merge, [fd])
  del parts, fd
  pre = _stage(out, "driver.prepare (total)", driver.prepare, cfg, [{}],
               None)
  out["prepare_data_bytes"] = data_bytes(pre.data)
  del pre
  _HELD.clear()
  return out


# ------------------------------------------------------------------- main


def _variant(name: str) -> tuple[str, str]:
  """``"<sampler>"`` (one epoch) or ``"<sampler>-steps"`` (LOCAL_STEPS)."""
  sampler, _, protocol = name.partition("-")
  if sampler not in SAMPLERS or protocol not in ("", "steps"):
    raise SystemExit(f"--variants {name!r} is not allowed: <sampler> or "
                     f"<sampler>-steps, sampler one of {tuple(SAMPLERS)}")
  return sampler, "steps" if protocol else "epochs"


def _linearity(results: dict, sampler: str, local_work: str) -> dict:
  """Cost ratios against the largest cohort; ``imbalance_ratio`` is the
  part lane imbalance explains (the largest cohort's padding efficiency over
  this cohort's) and ``overhead_ratio`` the rest (``ratio / imbalance``);
  ``round_time_fit``: least squares ``time = fixed + per_step * slot
  steps`` over every timed round (None with one trip count)."""
  largest = results[max(results, key=int)]
  ref = largest["cost_s_per_example"]["median"]
  ref_eff = largest["padding_efficiency"]["median"]
  for r in results.values():
    r["cost_ratio_to_largest"] = r["cost_s_per_example"]["median"] / ref
    r["imbalance_ratio"] = ref_eff / r["padding_efficiency"]["median"]
    r["overhead_ratio"] = r["cost_ratio_to_largest"] / r["imbalance_ratio"]
    r["within_target"] = r["cost_ratio_to_largest"] <= TARGET_RATIO
  # round time = fixed + per_slot_step * slot steps, over every round
  t = np.concatenate([r["per_round"]["time_s"] for r in results.values()])
  n = np.concatenate([r["per_round"]["slot_steps"] for r in results.values()])
  fit = None
  if len(np.unique(n)) > 1:
    (per_step, fixed), *_ = np.linalg.lstsq(
        np.stack([n, np.ones_like(n)], 1).astype(float), t, rcond=None)
    fit = {"fixed_s_per_round": float(fixed),
           "s_per_slot_step": float(per_step)}
  return {"sampler": sampler, "local_work": local_work, "cohorts": results,
          "target": TARGET_RATIO, "round_time_fit": fit,
          "ratios": {k: round(v["cost_ratio_to_largest"], 3)
                     for k, v in results.items()},
          "met": all(v["within_target"] for v in results.values())}


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--clients", type=int, default=100_000)
  p.add_argument("--cohorts", default="100,1000,10000")
  p.add_argument("--rounds", type=int, default=None,
                 help="timed rounds per cohort (default 20, quick 3)")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--variants", default=None,
                 help="comma-separated <sampler>[-steps]; sampler library "
                 "(the library's own sampler), choice, topk or permute "
                 "(what-if samplers passed to the round loop); -steps: "
                 "LOCAL_STEPS steps instead of one epoch (default: "
                 "library,choice on a CPU, library on an accelerator or "
                 "with --quick)")
  p.add_argument("--model", default="logreg", choices=("logreg", "mlp"))
  p.add_argument("--hidden", type=int, default=32)
  p.add_argument("--lanes", type=int, default=0,
                 help="kernel lanes (0: the library's default)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--prepare-path", choices=("auto", "yes", "no"),
                 default="auto", help="time driver.prepare's route (auto: "
                 "when --clients <= 100000)")
  p.add_argument("--no-profile", action="store_true",
                 help="skip the round profile at the largest cohort")
  p.add_argument("--quick", action="store_true",
                 help="10,000 clients, cohorts 10,100, 3 rounds, "
                 "variant library")
  p.add_argument("--out", default=None, metavar="DIR",
                 help="scale_<machine>[_quick].json: " + harness.OUT_HELP)
  p.add_argument("--machine", default=None, help="override the machine name")
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = _parse(argv)
  args.out = harness.results_dir(args.out, args.quick)
  if args.quick:
    if args.clients == 100_000:
      args.clients = 10_000
    if args.cohorts == "100,1000,10000":
      args.cohorts = "10,100"
  rounds = args.rounds or (3 if args.quick else 20)
  if args.variants is None:
    cpu = jax.default_backend() == "cpu"
    args.variants = "library,choice" if cpu and not args.quick else "library"
  cohorts = sorted(int(c) for c in args.cohorts.split(","))
  variants = args.variants.split(",")
  for v in variants:
    _variant(v)
  if cohorts[-1] > args.clients:
    raise SystemExit(f"--cohorts {args.cohorts}: a cohort is larger than "
                     f"--clients {args.clients}")
  report = {"benchmark": "scale", "machine": _machine(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "argv": sys.argv[1:] if argv is None else list(argv),
            "loadavg_start": _loadavg()}
  if args.machine:
    report["machine"]["name"] = args.machine
  log(f"scale benchmark on {report['machine']['name']}: {args.clients} "
      f"clients, cohorts {cohorts}, {rounds} rounds; load "
      f"{report['loadavg_start']}")
  t = time.perf_counter()
  fed = make_federation(args.clients, seed=args.seed)
  jax.block_until_ready(fed)
  gen_s = time.perf_counter() - t
  report["memory_after_generation"] = {
      "peak_rss_bytes": _rss_bytes(), "rss_bytes": _rss_now(),
      "device_peak_bytes": _device_peak()}
  nbytes = data_bytes(fed.data)
  s = fed.sizes
  report["workload"] = {
      "clients": args.clients, "examples": int(s.sum()),
      "features": NUM_FEATURES, "classes": fed.num_classes,
      "size_sigma": SIGMA, "min_examples": MIN_EXAMPLES,
      "client_sizes": {"median": float(np.median(s)), "mean": float(s.mean()),
                       "p99": float(np.percentile(s, 99)),
                       "max": int(s.max())},
      "model": args.model, "algorithm": "fedavg", "batch": BATCH,
      "microbatch": MICROBATCH, "local_steps (-steps variants)": LOCAL_STEPS,
      "client_lr": CLIENT_LR, "generator": "Synthetic-like: x ~ N(v_k, "
      "diag(j^-1.2)), v_k ~ N(B_k, 1), B_k ~ N(0, 1); y = argmax(W x + "
      "c_k), W shared, c_k ~ N(0, 1) per client (benchmarks.scale."
      "make_federation)",
      "generate_s": gen_s}
  report["data_bytes"] = dict(
      nbytes, ratio_to_raw_plus_per_client=nbytes["total"] / (
          nbytes["raw"] + nbytes["per_client"]),
      ratio_to_raw=nbytes["total"] / nbytes["raw"])
  log(f"data: {s.sum()} rows, sizes median {np.median(s):.0f} max {s.max()}"
      f", {nbytes['total'] / 2**20:.0f} MiB ({gen_s:.1f} s)")
  var = {v: _variant(v) for v in variants}
  per_variant, ctx = {v: {} for v in variants}, None
  kw = dict(model=args.model, hidden=args.hidden, lanes=args.lanes,
            local_steps=LOCAL_STEPS)
  for c in cohorts:
    res, c_ctx = bench_cohort(fed, c, var, rounds=rounds, warmup=args.warmup,
                              seed=args.seed, **kw)
    if c == cohorts[-1]:
      ctx = c_ctx
    del c_ctx
    for name, r in res.items():
      per_variant[name][str(c)] = r
      log(f"cohort {c:>6} {name:>14}: "
          f"{r['time_per_round_s']['median'] * 1e3:9.1f} ms/round, "
          f"{r['examples_per_round']['median']:9.0f} ex/round, "
          f"{r['useful_examples_per_s']['median']:9.3g} ex/s, eff "
          f"{r['padding_efficiency']['median']:.3f}, compile "
          f"{r['compile_s']:.1f} s, acc {r['test_accuracy'][0]:.3f} -> "
          f"{r['test_accuracy'][1]:.3f}")
  report["variants"] = {}
  for name, (sampler, local_work) in var.items():
    report["variants"][name] = _linearity(per_variant[name], sampler,
                                          local_work)
    fit = report["variants"][name]["round_time_fit"] or {}
    log(f"{name}: cost ratios {report['variants'][name]['ratios']} "
        f"(target <= {TARGET_RATIO}); round ~ "
        f"{fit.get('fixed_s_per_round', float('nan')) * 1e3:.2f} ms + "
        f"{fit.get('s_per_slot_step', float('nan')) * 1e3:.3f} ms/slot step")
  if not args.no_profile and ctx is not None:
    cfg, run, sim, state = ctx
    lib = next(v for v in variants if var[v][0] == "library")
    round_s = report["variants"][lib]["cohorts"][str(cohorts[-1])][
        "time_per_round_s"]["median"]
    report["profile"] = profile_round(fed, cfg, run, sim, state, round_s,
                                      args.seed)
    log("profile (s): " + ", ".join(
        f"{k} {v:.4f}" for k, v in report["profile"]["seconds"].items()))
  del ctx
  report["peak_rss_bytes_before_prepare_path"] = _rss_bytes()
  want = args.prepare_path == "yes" or (args.prepare_path == "auto" and
                                        args.clients <= 100_000)
  if want:
    log("driver.prepare route:")
    report["prepare_path"] = prepare_path(fed, cohorts[-1])
  report["peak_rss_bytes"] = _rss_bytes()
  report["device_peak_bytes"] = _device_peak()
  report["loadavg_end"] = _loadavg()
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, f"scale_{report['machine']['name']}"
                      + ("_quick.json" if args.quick else ".json"))
  with open(path, "w") as f:
    json.dump(report, f, indent=1)
  log(f"wrote {path}; peak RSS {report['peak_rss_bytes'] / 2**20:.0f} MiB")
  return report


if __name__ == "__main__":
  main()
