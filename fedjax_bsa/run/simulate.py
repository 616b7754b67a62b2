"""The round loop: ``E >= 1`` experiments, rounds in chunks under one jit.

:func:`make_simulation` returns pure functions (``init``, ``run_chunk``,
``evaluate``) over explicit arrays, in the style of PureJaxRL's
``make_train``; every argument and state leaf carries a leading experiment
axis ``[E]`` (a single run is ``E = 1``). Per round, each experiment samples
its cohort and plans it (:mod:`fedjax_bsa.plans`, ``vmap``-ped over
experiments); then the client jobs of **all** experiments are flattened
into one pool and run by one round kernel (:mod:`fedjax_bsa.kernel`), so a
sweep costs its total work, not ``E x`` its slowest experiment; then each
experiment's algorithm and server optimizer update its model (``vmap``-ped
again). See ``docs/design.md``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_bsa import algorithms
from fedjax_bsa import kernel as kernel_lib
from fedjax_bsa import plans
from fedjax_bsa.data import federated
from fedjax_bsa.kernel import layout
from fedjax_bsa.kernel import noise
from fedjax_bsa.plans import clock
from fedjax_bsa.plans import controllers
from fedjax_bsa.setup import models
from fedjax_bsa.setup.experiment import Experiment

__all__ = ["SimState", "RoundMetrics", "Simulation", "make_simulation",
           "Inputs", "sample_cohort"]

tmap = jax.tree.map


class SimState(NamedTuple):
  """Everything carried from round to round (leaves ``[E, ...]``)."""
  params: Any
  opt_state: Any
  alg_state: Any       # the algorithm's server state (control variates...)
  ctrl_state: Any
  feedback: controllers.Feedback
  sim_time: jax.Array  # float32 [E], simulated seconds so far
  round: jax.Array     # int32 [E], rounds done
  key: jax.Array


class Inputs(NamedTuple):
  """Per-experiment inputs (leaves ``[E, ...]``) besides the shared data."""
  resources: Any       # ClientResources [E, N]
  hparams: dict        # traced settings [E]
  first_client: jax.Array  # int32 [E], experiment's client 0 in the data
  num_examples: jax.Array  # int32 [E, N], rows of each client


class RoundMetrics(NamedTuple):
  """Per-round scalars (stacked over a chunk) and per-client plans."""
  train_loss: jax.Array
  round_time: jax.Array
  sim_time: jax.Array
  deadline: jax.Array
  mean_batch: jax.Array
  min_batch: jax.Array
  max_batch: jax.Array
  over_cap: jax.Array         # clients whose batch exceeded their memory cap
  noise_scale: jax.Array      # median within-client B_simple of reporters
  cohort_noise_scale: jax.Array  # B_simple across clients (mean updates)
  mean_gain: jax.Array        # mean lr_k / client_lr over participants
  mean_lr: jax.Array          # client learning rates over participants
  min_lr: jax.Array
  max_lr: jax.Array
  mean_steps: jax.Array       # local steps over participants
  min_steps: jax.Array
  max_steps: jax.Array
  heterogeneity: jax.Array
  participants: jax.Array
  dropped: jax.Array
  failed: jax.Array           # clients whose model went non-finite (left out)
  no_fit: jax.Array           # clients with no step that fits the deadline
  partial: jax.Array          # clients whose steps were cut by a deadline
  examples: jax.Array
  padding_efficiency: jax.Array
  done: jax.Array             # this round ran (False past the last round)
  cohort: jax.Array           # int32 [K]
  batch: jax.Array            # int32 [K]
  steps: jax.Array            # int32 [K]
  lr: jax.Array               # float32 [K]
  b_simple: jax.Array         # float32 [K], this round's own estimate


def sample_cohort(key, num_clients: int, cohort_size: int) -> jax.Array:
  """``K`` distinct clients drawn uniformly from ``N`` (without
  replacement): the ``K`` largest of ``N`` uniform keys, in ``O(N)`` (a
  full shuffle of the ``N`` clients costs 10x more at ``N = 10^5``).

  >>> sample_cohort(jax.random.key(0), 10, 3).shape
  (3,)
  """
  u = jax.random.uniform(key, (num_clients,))
  return jax.lax.top_k(u, cohort_size)[1].astype(jnp.int32)


def _masked_median(x, mask):
  """Median of ``x[mask]`` (0 if empty), with static shapes."""
  k = mask.sum()
  srt = jnp.sort(jnp.where(mask, x, jnp.inf))
  lo = srt[jnp.maximum((k - 1) // 2, 0)]
  hi = srt[jnp.maximum(k // 2, 0)]
  return jnp.where(k > 0, 0.5 * (lo + hi), 0.0)


@dataclasses.dataclass(frozen=True)
class Simulation:
  init: Any        # (key[E], data, inputs) -> SimState
  run_chunk: Any   # (state, data, inputs, rounds_left) -> (state, metrics)
  evaluate: Any    # (params[E], x[E], y[E]) -> (accuracy[E], loss[E])
  chunk: int
  lanes: int
  traces: list     # one entry per trace of run_chunk (compile counter)
  microbatch: int = 0   # the kernel's layout: mu and R
  per_slot: int = 0


class _Static(NamedTuple):
  """What the round loop closes over (static: never traced)."""
  cfg: Any
  model: Any               # models.Model
  alg: algorithms.Algorithm
  model_bytes: int
  E: int
  K: int
  N: int
  kernel: Any              # the round kernel
  mesh: Any
  max_rows: int | None
  sampler: Callable        # (key, N, K) -> int32 [K] distinct clients
  microbatch: int          # the kernel's mu


def make_simulation(exp: Experiment, num_experiments: int = 1, *,
                    chunk: int | None = None, lanes: int | None = None,
                    mesh: jax.sharding.Mesh | None = None,
                    axis_name: str = "clients",
                    max_rows: int | None = None,
                    sampler: Callable | None = None,
                    microbatch: int | None = None,
                    per_slot: int | None = None) -> Simulation:
  """Pure functions of ``E`` experiments that share static settings.

  Args:
    exp: one of the experiments (its config's static choices, model and
      algorithm are shared by all; data, resources and traced settings are
      arguments of the returned functions).
    num_experiments: ``E``.
    chunk: rounds per ``run_chunk`` call (default ``cfg.eval_every``).
    lanes: the kernel's lane pool (default: the ``lanes`` setting, else
      :func:`fedjax_bsa.kernel.layout.choose` for ``E x K`` jobs on this backend).
    mesh: if given, the kernel's lanes are split over its ``axis_name``
      axis and the data may be sharded over rows (``max_rows`` is then the
      static bound of a round's rows, see :func:`fedjax_bsa.kernel.
      cohort_rows`).
    axis_name: the mesh axis of the lanes.
    max_rows: see ``mesh``.
    sampler: draws each round's cohort, ``sampler(key, N, K) -> int32 [K]``
      distinct clients (default :func:`sample_cohort`; a benchmark's
      what-if).
    microbatch: the kernel's ``mu`` (default ``cfg.kernel_microbatch``).
    per_slot: the kernel's ``R`` (default: the ``per_slot`` setting, else
      :func:`fedjax_bsa.kernel.layout.choose`). :func:`fedjax_bsa.run.autotune.
      choose_layout` measures ``lanes``, ``microbatch`` and ``per_slot``.

  Returns:
    A :class:`Simulation`.
  """
  cfg = exp.cfg
  E, K = int(num_experiments), cfg.clients_per_round
  mu = int(microbatch or cfg.kernel_microbatch)
  auto = layout.choose(jax.default_backend(), E * K, mu, cfg.batch_size)
  lanes = int(lanes or cfg.lanes or auto.lanes)
  per_slot = int(per_slot or cfg.per_slot or auto.per_slot)
  kern = kernel_lib.make_round_kernel(
      functools.partial(models.example_losses, exp.model.apply),
      exp.algorithm.client_tx, exp.algorithm.client_init,
      microbatch=mu, lanes=lanes, per_slot=per_slot, num_experiments=E,
      noise_stats=cfg.noise_stats, client_deltas=exp.algorithm.client_deltas,
      mesh=mesh, axis_name=axis_name)
  sv = _Static(cfg, exp.model, exp.algorithm, exp.model_bytes, E, K,
               exp.num_clients, kern, mesh, max_rows,
               sample_cohort if sampler is None else sampler, mu)
  traces = []

  def init(keys, data, inputs: Inputs):
    del data
    return jax.vmap(functools.partial(_init_one, sv))(keys, inputs.hparams)

  def run_chunk(st, data, inputs: Inputs, rounds_left):
    traces.append(1)
    return _run_chunk(sv, int(chunk or cfg.eval_every), st, data, inputs,
                      rounds_left)

  evaluate = jax.vmap(functools.partial(models.evaluate_model, exp.model.apply))
  return Simulation(init, run_chunk, evaluate,
                    int(chunk or cfg.eval_every), lanes, traces, mu, per_slot)


def _server_tx(sv: _Static, hp):
  return algorithms.server_optimizer(sv.cfg, hp["server_lr"])


def _init_one(sv: _Static, key, hp) -> SimState:
  k_params, k_run = jax.random.split(key)
  params = sv.model.init(k_params)
  return SimState(params, _server_tx(sv, hp).init(params),
                  sv.alg.init(params, sv.N),
                  plans.make_controller(sv.cfg, hp).init(sv.N),
                  controllers.empty_feedback(sv.K), jnp.float32(0.0),
                  jnp.int32(0), k_run)


def _plan_one(sv: _Static, st: SimState, res, hp, n_all):
  """One experiment's cohort and plan for the coming round."""
  key, k_cohort, k_avail, k_plan, k_shuffle = jax.random.split(st.key, 5)
  cohort = sv.sampler(k_cohort, sv.N, sv.K)
  rc = tmap(lambda a: a[cohort], res)
  n = n_all[cohort]
  ctx = controllers.Context(st.round, cohort, rc.speed, rc.step_overhead,
                            rc.memory_cap, k_plan, n,
                            clock.comm_time(rc, sv.model_bytes))
  available = clock.sample_available(k_avail, rc.availability)
  rp, ctrl_state = plans.plan_round(
      sv.cfg, hp, plans.make_controller(sv.cfg, hp), st.feedback,
      st.ctrl_state, ctx, rc, available, sv.model_bytes)
  run = rp.plan
  weights = sv.alg.weights(run.batch_size * run.steps, run.steps, n, hp,
                           run.lr)
  inputs = sv.alg.client_inputs(st.alg_state, cohort, hp)
  seeds = federated.shuffle_seeds(k_shuffle, cohort)
  return (cohort, rc, n, rp, weights, inputs, seeds, ctrl_state, key)


def _finish_one(sv: _Static, st: SimState, hp, cohort, rc, n,
                rp: plans.RoundPlan, ctrl_state, key, delta, stats, usum,
                cdeltas):
  """One experiment's server update, clock and metrics after the kernel."""
  del n
  run = rp.plan
  result = algorithms.RoundResult(delta, cdeltas, cohort, run.steps, run.lr,
                                  sv.N)
  delta, alg_state = sv.alg.server_update(st.alg_state, result, hp)
  updates, opt_state = _server_tx(sv, hp).update(
      tmap(jnp.negative, delta), st.opt_state, st.params)
  params = optax.apply_updates(st.params, updates)
  sim_time = st.sim_time + rp.outcome.round_time
  metrics = _metrics(hp, cohort, rc, rp, stats, usum, sim_time, sv.N)
  new = SimState(params, opt_state, alg_state, ctrl_state,
                 controllers.Feedback(cohort, stats, usum), sim_time,
                 st.round + 1, key)
  return new, metrics


def _one_round(sv: _Static, st: SimState, data, inputs: Inputs):
  """One round of all ``E`` experiments: plans (vmapped), one kernel over
  every job, server updates (vmapped)."""
  E, K = sv.E, sv.K
  (cohort, rc, n, rp, weights, cinputs, seeds, ctrl_state,
   key) = jax.vmap(functools.partial(_plan_one, sv))(
       st, inputs.resources, inputs.hparams, inputs.num_examples)
  flat = lambda a: a.reshape((E * K,) + a.shape[2:])
  run = rp.plan
  jobs = kernel_lib.Jobs(
      flat(cohort + inputs.first_client[:, None]),
      jnp.repeat(jnp.arange(E, dtype=jnp.int32), K), flat(run.batch_size),
      flat(run.steps), flat(run.lr), flat(weights), flat(seeds))
  if sv.mesh is not None:
    data = kernel_lib.cohort_rows(data, jobs.client, sv.max_rows)
    jobs = jobs._replace(client=jnp.arange(E * K, dtype=jnp.int32))
  out = sv.kernel(st.params, data, jobs, tmap(flat, cinputs))
  unflat = lambda a: a.reshape((E, K) + a.shape[1:])
  cdeltas = (None if out.client_deltas is None
             else tmap(unflat, out.client_deltas))
  new, m = jax.vmap(functools.partial(_finish_one, sv))(
      st, inputs.hparams, cohort, rc, n, rp, ctrl_state, key, out.delta,
      tmap(unflat, out.stats), out.update_sum_sq, cdeltas)
  eff = out.useful / jnp.maximum(out.slots * sv.microbatch, 1)
  return new, m._replace(padding_efficiency=jnp.broadcast_to(eff, (E,)))


def _run_chunk(sv: _Static, chunk: int, st, data, inputs: Inputs,
               rounds_left):
  """Runs ``min(chunk, rounds_left)`` rounds (shapes fixed at ``chunk``);
  metrics are ``[E, chunk, ...]``."""
  one = functools.partial(_one_round, sv)

  def body(carry, i):
    def skip(c):
      _, m = jax.eval_shape(one, c, data, inputs)
      m = tmap(lambda s: jnp.zeros(s.shape, s.dtype), m)
      return c, m._replace(done=jnp.zeros((sv.E,), bool))
    return jax.lax.cond(i < rounds_left, lambda c: one(c, data, inputs),
                        skip, carry)

  st, m = jax.lax.scan(body, st, jnp.arange(chunk))
  return st, tmap(lambda a: jnp.moveaxis(a, 0, 1), m)


def round_train_loss(stats):
  """A round's training loss and its failed clients: ``(loss, failed)``.

  A client whose model went non-finite (``update_sq`` or its loss not
  finite) was left out of the round's average by the kernel
  (:func:`fedjax_bsa.kernel.lanes.job_end`); the loss is the example-weighted mean
  over the clients that ran and did not fail, and NaN when every client
  that ran failed (the experiment then diverges).

  >>> from fedjax_bsa.kernel import ClientStats
  >>> z = jnp.zeros(3)
  >>> st = ClientStats(jnp.array([1.0, 3.0, jnp.nan]), jnp.array([10, 30, 20]),
  ...                  jnp.array([1, 1, 1]), z, z, jnp.array([1, 1, 1]),
  ...                  jnp.array([0.1, 0.1, jnp.nan]))
  >>> loss, failed = round_train_loss(st)
  >>> float(loss), failed.tolist()       # (10 * 1 + 30 * 3) / 40
  (2.5, [False, False, True])
  """
  ran = stats.steps > 0
  failed = kernel_lib.failed_jobs(stats)
  ok = ran & ~failed
  ex = jnp.where(ok, stats.examples, 0)
  loss = jnp.sum(jnp.where(ok, stats.loss, 0.0) * ex) / jnp.maximum(
      ex.sum(), 1)
  return jnp.where(ran.any() & ~ok.any(), jnp.nan, loss), failed


def _metrics(hp, cohort, rc, rp: plans.RoundPlan, stats, usum, sim_time,
             num_clients) -> RoundMetrics:
  """One experiment's round metrics."""
  run, outcome = rp.plan, rp.outcome
  took = outcome.participated & (run.steps > 0)
  ftook = took.astype(jnp.float32)
  nt = jnp.maximum(ftook.sum(), 1.0)
  bf = run.batch_size.astype(jnp.float32)
  b_simple = noise.noise_scale(stats.grad_sq, stats.trace)
  # a round's |G|^2 estimate can be <= 0 (it is unbiased, not positive):
  # its ratio is no estimate of B, and is left out of the record
  reporting = took & (stats.noise_steps > 0) & (stats.grad_sq > 0)
  mean_sq = jnp.sum(stats.update_sq * ftook) / nt
  c_g, c_t = noise.cohort_estimates(mean_sq, usum / nt ** 2, took.sum(),
                                    num_clients)
  train_loss, failed = round_train_loss(stats)
  return RoundMetrics(
      train_loss=train_loss, failed=failed.sum(),
      round_time=outcome.round_time, sim_time=sim_time, deadline=rp.deadline,
      mean_batch=jnp.sum(bf * ftook) / nt,
      min_batch=jnp.min(jnp.where(took, bf, jnp.inf)),
      max_batch=jnp.max(jnp.where(took, bf, 0.0)),
      over_cap=jnp.sum(took & (run.batch_size > rc.memory_cap)),
      noise_scale=_masked_median(b_simple, reporting),
      cohort_noise_scale=jnp.where(took.sum() >= 2,
                                   noise.noise_scale(c_g, c_t), jnp.nan),
      mean_gain=jnp.sum(run.lr / hp["client_lr"] * ftook) / nt,
      mean_lr=jnp.sum(run.lr * ftook) / nt,
      min_lr=jnp.min(jnp.where(took, run.lr, jnp.inf)),
      max_lr=jnp.max(jnp.where(took, run.lr, 0.0)),
      mean_steps=jnp.sum(run.steps * ftook) / nt,
      min_steps=jnp.min(jnp.where(took, run.steps, 2**30)),
      max_steps=jnp.max(jnp.where(took, run.steps, 0)),
      heterogeneity=jnp.maximum(mean_sq - usum / nt ** 2, 0.0),
      participants=took.sum(), dropped=outcome.dropped.sum(),
      no_fit=rp.no_fit.sum(),
      partial=jnp.sum(took & (outcome.steps < rp.planned_steps)),
      examples=(run.batch_size * run.steps).sum(),
      padding_efficiency=jnp.float32(0.0), done=jnp.bool_(True),
      cohort=cohort,
      batch=run.batch_size, steps=run.steps, lr=run.lr,
      b_simple=jnp.where(reporting, b_simple, jnp.nan))
