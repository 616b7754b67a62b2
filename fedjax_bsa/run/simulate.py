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
from fedjax_bsa.core.static import static_view
from fedjax_bsa.core.static import StaticConfig
from fedjax_bsa.data import federated
from fedjax_bsa.kernel import layout
from fedjax_bsa.plans import clock
from fedjax_bsa.plans import controllers
from fedjax_bsa.run.metrics import round_metrics
from fedjax_bsa.run.metrics import RoundMetrics
from fedjax_bsa.setup import models
from fedjax_bsa.setup.experiment import Experiment

__all__ = ["SimState", "RoundMetrics", "Simulation", "make_simulation",
           "Inputs", "sample_cohort", "CohortPlan", "KernelResult"]

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
  hparams: Any         # config.HParams, the traced settings [E]
  first_client: jax.Array  # int32 [E], experiment's client 0 in the data
  num_examples: jax.Array  # int32 [E, N], rows of each client


def sample_cohort(key, num_clients: int, cohort_size: int) -> jax.Array:
  """``K`` distinct clients drawn uniformly from ``N`` (without
  replacement): the ``K`` largest of ``N`` uniform keys, in ``O(N)`` (a
  full shuffle of the ``N`` clients costs 10x more at ``N = 10^5``).

  >>> sample_cohort(jax.random.key(0), 10, 3).shape
  (3,)
  """
  u = jax.random.uniform(key, (num_clients,))
  return jax.lax.top_k(u, cohort_size)[1].astype(jnp.int32)


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
  cfg: StaticConfig        # the config without its traced settings
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
      :func:`fedjax_bsa.kernel.layout.choose` for ``E x K`` jobs on this
      backend).
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
  sv = _Static(static_view(cfg), exp.model, exp.algorithm, exp.model_bytes, E,
    K,
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


class CohortPlan(NamedTuple):
  """One experiment's coming round, before the kernel (``[K]`` leaves)."""
  cohort: jax.Array        # int32 [K], client ids
  resources: Any           # ClientResources of the cohort
  sizes: jax.Array         # int32 [K], examples each holds
  plan: plans.RoundPlan    # batch, steps, rate; deadline; who is aggregated
  weights: jax.Array       # float32 [K], aggregation coefficients
  client_inputs: Any       # the algorithm's per-client inputs
  seeds: jax.Array         # uint32 [K, ...], shuffle seeds
  ctrl_state: Any          # the controller's state after planning
  key: jax.Array           # the experiment's key for the next round


class KernelResult(NamedTuple):
  """One experiment's share of the round kernel's output."""
  delta: Any               # sum_k c_k (x_k - x), a params tree
  stats: Any               # ClientStats, [K] leaves
  update_sum_sq: jax.Array  # float32 [], |sum_k h_k|^2
  client_deltas: Any       # [K, ...] x_k - x, or None


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
  return CohortPlan(cohort, rc, n, rp, weights, inputs, seeds, ctrl_state,
                    key)


def _finish_one(sv: _Static, st: SimState, hp, cp: CohortPlan,
                kr: KernelResult):
  """One experiment's server update, clock and metrics after the kernel."""
  rp, cohort = cp.plan, cp.cohort
  run = rp.plan
  result = algorithms.RoundResult(kr.delta, kr.client_deltas, cohort,
                                  run.steps, run.lr, sv.N)
  delta, alg_state = sv.alg.server_update(st.alg_state, result, hp)
  updates, opt_state = _server_tx(sv, hp).update(
      tmap(jnp.negative, delta), st.opt_state, st.params)
  params = optax.apply_updates(st.params, updates)
  sim_time = st.sim_time + rp.outcome.round_time
  metrics = round_metrics(hp, cohort, cp.resources, rp, kr.stats,
                     kr.update_sum_sq, sim_time, sv.N)
  new = SimState(params, opt_state, alg_state, cp.ctrl_state,
                 controllers.Feedback(cohort, kr.stats, kr.update_sum_sq),
                 sim_time, st.round + 1, cp.key)
  return new, metrics


def _one_round(sv: _Static, st: SimState, data, inputs: Inputs):
  """One round of all ``E`` experiments: plans (vmapped), one kernel over
  every job, server updates (vmapped)."""
  E, K = sv.E, sv.K
  cp = jax.vmap(functools.partial(_plan_one, sv))(
      st, inputs.resources, inputs.hparams, inputs.num_examples)
  flat = lambda a: a.reshape((E * K,) + a.shape[2:])
  run = cp.plan.plan
  jobs = kernel_lib.Jobs(
      flat(cp.cohort + inputs.first_client[:, None]),
      jnp.repeat(jnp.arange(E, dtype=jnp.int32), K), flat(run.batch_size),
      flat(run.steps), flat(run.lr), flat(cp.weights), flat(cp.seeds))
  if sv.mesh is not None:
    data = kernel_lib.cohort_rows(data, jobs.client, sv.max_rows)
    jobs = jobs._replace(client=jnp.arange(E * K, dtype=jnp.int32))
  out = sv.kernel(st.params, data, jobs, tmap(flat, cp.client_inputs))
  unflat = lambda a: a.reshape((E, K) + a.shape[1:])
  cdeltas = (None if out.client_deltas is None
             else tmap(unflat, out.client_deltas))
  kr = KernelResult(out.delta, tmap(unflat, out.stats), out.update_sum_sq,
                    cdeltas)
  new, m = jax.vmap(functools.partial(_finish_one, sv))(
      st, inputs.hparams, cp, kr)
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
