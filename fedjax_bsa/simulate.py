"""The driver: rounds in chunks under one ``jit``, evaluation and outputs.

:func:`make_simulation` returns pure functions (``init``, ``run_chunk``,
``evaluate``) over explicit arrays, in the style of PureJaxRL's
``make_train``: the data, resources and hyperparameters are arguments, so a
sweep can ``vmap`` them. :func:`run` is the host loop around them: it runs
``eval_every`` rounds per compiled call, evaluates, writes ``metrics.jsonl``,
shows progress and stops on divergence.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_bsa import algorithms
from fedjax_bsa import clock
from fedjax_bsa import controllers
from fedjax_bsa import kernel as kernel_lib
from fedjax_bsa import models
from fedjax_bsa import noise
from fedjax_bsa.experiment import Experiment, make_controller

__all__ = ["SimState", "RoundMetrics", "Simulation", "make_simulation",
           "hparams_of"]

tmap = jax.tree.map


class SimState(NamedTuple):
  """Everything carried from round to round (a pytree of arrays)."""
  params: Any
  opt_state: Any
  ctrl_state: Any
  feedback: controllers.Feedback
  control: Any        # SCAFFOLD (c, c_k [N, ...]) or () for other algorithms
  sim_time: jax.Array  # float32 [], simulated seconds so far
  round: jax.Array     # int32 [], rounds done
  key: jax.Array


class RoundMetrics(NamedTuple):
  """Per-round scalars (stacked over a chunk) and per-client plans."""
  train_loss: jax.Array
  round_time: jax.Array
  sim_time: jax.Array
  mean_batch: jax.Array
  min_batch: jax.Array
  max_batch: jax.Array
  over_cap: jax.Array         # clients whose batch exceeded their memory cap
  noise_scale: jax.Array      # median B_simple over reporting clients
  mean_gain: jax.Array        # mean lr_k / client_lr over participants
  heterogeneity: jax.Array
  participants: jax.Array
  dropped: jax.Array
  partial: jax.Array          # clients whose steps were cut by a deadline
  examples: jax.Array
  padding_efficiency: jax.Array
  done: jax.Array             # this round ran (False past the last round)
  cohort: jax.Array           # int32 [K]
  batch: jax.Array            # int32 [K]
  steps: jax.Array            # int32 [K]
  lr: jax.Array               # float32 [K]
  b_simple: jax.Array         # float32 [K], this round's own estimate


def hparams_of(cfg, resources=None) -> dict:
  """Hyperparameters that may be traced (and vmapped by a sweep).

  Args:
    cfg: the settings.
    resources: the clients' :class:`~fedjax_bsa.resources.ClientResources`
      (host); gives ``reference_speed``, the median client speed the
      ``resource_proportional`` controller scales by (``cfg.base_speed``
      when omitted).

  Returns:
    A dict of float32 scalars (numpy, so that they can be stacked).
  """
  ref = (np.median(np.asarray(resources.speed)) if resources is not None
         else cfg.base_speed)
  return dict(client_lr=np.float32(cfg.client_lr),
              server_lr=np.float32(cfg.server_lr),
              kappa=np.float32(cfg.kappa),
              ema_decay=np.float32(cfg.ema_decay),
              reference_speed=np.float32(ref))


def _masked_median(x, mask):
  """Median of ``x[mask]`` (0 if empty), with static shapes."""
  k = mask.sum()
  srt = jnp.sort(jnp.where(mask, x, jnp.inf))
  lo = srt[jnp.maximum((k - 1) // 2, 0)]
  hi = srt[jnp.maximum(k // 2, 0)]
  return jnp.where(k > 0, 0.5 * (lo + hi), 0.0)


@dataclasses.dataclass(frozen=True)
class Simulation:
  init: Any        # (key, data, resources, hparams) -> SimState
  run_chunk: Any   # (state, data, resources, hparams, rounds_left) -> ...
  evaluate: Any    # (params, x, y) -> (accuracy, loss)
  chunk: int
  traces: list     # one entry per trace of run_chunk (compile counter)


def make_simulation(exp: Experiment, chunk: int | None = None,
                    mesh: jax.sharding.Mesh | None = None,
                    axis_name: str = "clients",
                    batch_axis: str | None = None) -> Simulation:
  """Pure functions of one configured simulation (the caller jits them).

  Args:
    exp: the built experiment; only its static parts are closed over (the
      config's shapes and choices, the model); data, resources and
      hyperparameters are arguments of the returned functions.
    chunk: rounds per ``run_chunk`` call (default ``cfg.eval_every``).
    mesh: if given, the round kernel's lanes are sharded over its
      ``axis_name`` axis (see :func:`fedjax_bsa.kernel.make_round_kernel`).
      The data may then carry padding clients past ``len(exp.parts)``;
      they are never sampled.
    axis_name: the mesh axis of the clients.
    batch_axis: the ``jax.vmap`` axis name when the functions are vmapped
      over experiments (see the kernel's ``loop_axis_name``).

  Returns:
    A :class:`Simulation`.
  """
  cfg = exp.cfg
  K = cfg.clients_per_round
  num_clients = len(exp.parts)
  chunk = int(chunk or cfg.eval_every)
  algorithm = cfg.algorithm
  kernel_of = functools.partial(
      kernel_lib.make_round_kernel, exp.model.apply,
      microbatch=cfg.microbatch, lanes=exp.lanes,
      noise_stats=cfg.noise_stats,
      prox_mu=cfg.prox_mu if algorithm == "fedprox" else 0.0,
      momentum=cfg.client_momentum,
      per_client_outputs=algorithm == "scaffold", mesh=mesh,
      axis_name=axis_name)
  kern = kernel_of(loop_axis_name=batch_axis)
  plain_kern = kernel_of()  # for shapes only: binds no vmap axis
  traces = []

  def tx_of(hp):
    return algorithms.server_optimizer(cfg.server_optimizer, hp["server_lr"],
                                       cfg.server_momentum)

  def ctrl_of(hp):
    return make_controller(cfg, exp.resources, hp["client_lr"], hp["kappa"],
                           hp["ema_decay"], hp.get("reference_speed"))

  def init(key, data, resources, hparams):
    del resources
    k_params, k_run = jax.random.split(key)
    params = exp.model.init(k_params)
    control = ()
    if algorithm == "scaffold":
      n = num_clients
      zeros = tmap(jnp.zeros_like, params)
      control = (zeros, tmap(lambda a: jnp.zeros((n,) + a.shape, a.dtype),
                             params))
    return SimState(params, tx_of(hparams).init(params),
                    ctrl_of(hparams).init(num_clients),
                    controllers.empty_feedback(K), control,
                    jnp.float32(0.0), jnp.int32(0), k_run)

  def one_round(st: SimState, data, res, hp, kern=kern):
    n_clients = num_clients
    key, k_cohort, k_avail, k_plan, k_kernel = jax.random.split(st.key, 5)
    cohort = jax.random.choice(k_cohort, n_clients, (K,), replace=False)
    cohort = cohort.astype(jnp.int32)
    rc = tmap(lambda a: a[cohort], res)
    ctx = controllers.Context(st.round, cohort, rc.speed, rc.step_overhead,
                              rc.memory_cap, k_plan,
                              data.num_examples[cohort])
    plan, ctrl_state = ctrl_of(hp).update(st.feedback, st.ctrl_state, ctx)
    available = clock.sample_available(k_avail, rc.availability)
    outcome = clock.apply_round_policy(
        cfg.round_policy, rc, plan.batch_size, plan.steps, available,
        exp.model_bytes, cfg.deadline if cfg.deadline > 0 else None)
    run_plan = plan._replace(steps=outcome.steps)
    examples = run_plan.batch_size * run_plan.steps
    weights = algorithms.aggregation_weights(
        algorithm, examples, run_plan.steps, data.num_examples[cohort],
        cfg.client_momentum)
    correction, control = None, st.control
    if algorithm == "scaffold":
      c_server, c_clients = st.control
      correction = tmap(lambda cs, cc: cs[None] - cc[cohort], c_server,
                        c_clients)
    out = kern(st.params, data, cohort, run_plan, weights, k_kernel,
               correction)
    if algorithm == "scaffold":
      control = algorithms.scaffold_update(
          c_server, c_clients, cohort, out.client_delta, run_plan.steps,
          run_plan.lr, n_clients)
    tx = tx_of(hp)
    updates, opt_state = tx.update(tmap(jnp.negative, out.delta),
                                   st.opt_state, st.params)
    params = optax.apply_updates(st.params, updates)
    sim_time = st.sim_time + outcome.round_time

    took = outcome.participated & (run_plan.steps > 0)
    ftook = took.astype(jnp.float32)
    nt = jnp.maximum(ftook.sum(), 1.0)
    bf = run_plan.batch_size.astype(jnp.float32)
    stats = out.stats
    b_simple = noise.noise_scale(stats.grad_sq, stats.trace)
    reporting = took & (stats.noise_steps > 0)
    metrics = RoundMetrics(
        train_loss=jnp.sum(stats.loss * stats.examples) /
        jnp.maximum(stats.examples.sum(), 1),
        round_time=outcome.round_time, sim_time=sim_time,
        mean_batch=jnp.sum(bf * ftook) / nt,
        min_batch=jnp.min(jnp.where(took, bf, jnp.inf)),
        max_batch=jnp.max(jnp.where(took, bf, 0.0)),
        over_cap=jnp.sum(took & (run_plan.batch_size > rc.memory_cap)),
        noise_scale=_masked_median(b_simple, reporting),
        mean_gain=jnp.sum(run_plan.lr / hp["client_lr"] * ftook) / nt,
        heterogeneity=out.heterogeneity, participants=took.sum(),
        dropped=outcome.dropped.sum(),
        partial=jnp.sum(took & (outcome.steps < plan.steps)),
        examples=examples.sum(),
        padding_efficiency=out.useful / jnp.maximum(
            out.slots * cfg.microbatch, 1),
        done=jnp.bool_(True), cohort=cohort,
        batch=run_plan.batch_size, steps=run_plan.steps, lr=run_plan.lr,
        b_simple=jnp.where(reporting, b_simple, jnp.nan))
    feedback = controllers.Feedback(cohort, stats)
    new = SimState(params, opt_state, ctrl_state, feedback, control,
                   sim_time, st.round + 1, key)
    return new, metrics

  def run_chunk(st, data, res, hp, rounds_left):
    """Runs ``min(chunk, rounds_left)`` rounds (shapes fixed at ``chunk``)."""
    traces.append(1)

    def body(carry, i):
      def skip(c):
        _, m = jax.eval_shape(
            functools.partial(one_round, kern=plain_kern), c, data, res, hp)
        m = tmap(lambda s: jnp.zeros(s.shape, s.dtype), m)
        return c, m._replace(done=jnp.bool_(False))
      return jax.lax.cond(i < rounds_left,
                          lambda c: one_round(c, data, res, hp), skip, carry)

    return jax.lax.scan(body, st, jnp.arange(chunk))

  def evaluate(params, x, y):
    """Test accuracy and mean loss, in batches of 512."""
    n = x.shape[0]
    bs = 512
    pad = (-n) % bs
    xp = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)])
    yp = jnp.concatenate([y, jnp.zeros((pad,), y.dtype)])
    valid = jnp.arange(n + pad) < n

    def batch(carry, i):
      xb = jax.lax.dynamic_slice_in_dim(xp, i * bs, bs)
      yb = jax.lax.dynamic_slice_in_dim(yp, i * bs, bs)
      vb = jax.lax.dynamic_slice_in_dim(valid, i * bs, bs)
      logits = exp.model.apply(params, xb)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
      correct = (jnp.argmax(logits, -1) == yb) & vb
      return (carry[0] + correct.sum(), carry[1] + jnp.where(vb, loss,
                                                             0.0).sum()), None

    (correct, loss), _ = jax.lax.scan(
        batch, (jnp.int32(0), jnp.float32(0.0)), jnp.arange((n + pad) // bs))
    return correct / n, loss / n

  return Simulation(init, run_chunk, evaluate, chunk, traces)
