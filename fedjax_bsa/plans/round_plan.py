"""One round's plan for one experiment: batch, learning rate, local work,
deadline and who is aggregated.

The pipeline (pure, jittable, ``vmap``-ped over experiments by the round
loop):

1. the **controller** (:data:`~fedjax_bsa.core.registry.CONTROLLERS`) picks
   each cohort client's batch and learning rate from what the last round
   reported, bounded by the client's memory
   (:func:`~fedjax_bsa.plans.controllers. clamp`);
2. the **deadline rule** (:data:`~fedjax_bsa.core.registry.DEADLINE_RULES`) sets
   the round's deadline ``D`` from the cohort's predicted one-epoch times;
3. the **local work** protocol (:data:`~fedjax_bsa.core.registry.LOCAL_WORK`)
   sets the steps: a fixed number, ``ceil(epochs n_k / b_k)``, or the steps
   that fit ``D``; a ``time_budget`` caps them;
4. the **round policy** (:data:`~fedjax_bsa.core.registry.ROUND_POLICIES`)
   decides who is aggregated with how many steps, and the round's length.

The controllers, schedules and local-work protocols are registered by name
here, the deadline rules in :mod:`fedjax_bsa.plans.deadline` and the round
policies in :mod:`fedjax_bsa.plans.policies`, each beside its definition;
factories take ``(cfg, hparams)`` with ``hparams`` the traced settings
(:func:`fedjax_bsa.core.config.hparams`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_bsa.core import registry as reg
from fedjax_bsa.plans import clock
from fedjax_bsa.plans import controllers
from fedjax_bsa.plans import deadline as deadline_lib
from fedjax_bsa.plans import displacement as displacement_lib
from fedjax_bsa.plans import goodput as goodput_lib
from fedjax_bsa.plans import policies
from fedjax_bsa.plans.controllers import Plan

__all__ = ["RoundPlan", "make_controller", "plan_round", "decayed_lr"]


# ------------------------------------------------------------- controllers


@reg.CONTROLLERS.register("constant")
def _constant(cfg, hp):
  """One batch for everyone (``batch_size``)."""
  return controllers.constant(hp["batch_size"], hp["local_steps"],
                              hp["client_lr"])


@reg.CONTROLLERS.register("random")
def _random(cfg, hp):
  """A fresh uniform batch in [batch_min, batch_max] per client per round."""
  return controllers.random(cfg.batch_min, cfg.batch_max, hp["local_steps"],
                            hp["client_lr"])


@reg.CONTROLLERS.register("schedule")
def _schedule(cfg, hp):
  """Step, linear ramp or doubling every ``schedule_every`` rounds."""
  return controllers.schedule(reg.SCHEDULES.get(cfg.schedule),
                              hp["batch_size"], cfg.batch_max,
                              cfg.schedule_every, cfg.rounds,
                              hp["local_steps"], hp["client_lr"])


@reg.CONTROLLERS.register("resource_proportional")
def _resource_proportional(cfg, hp):
  """Batch proportional to device speed (Ma et al., IEEE TMC 2021)."""
  return controllers.resource_proportional(
      hp["batch_size"], hp["reference_speed"], hp["local_steps"],
      hp["client_lr"])


@reg.CONTROLLERS.register("noise_scale", quantized=True)
def _noise_scale(cfg, hp):
  """Ours, v1: batch from each client's critical batch (noise scale)."""
  return controllers.noise_scale(
      hp["batch_size"], cfg.batch_min, cfg.batch_max, hp["kappa"],
      hp["local_steps"], hp["client_lr"], hp["ema_decay"],
      cfg.kernel_microbatch, max_gain=hp["max_gain"])


@reg.CONTROLLERS.register("goodput", quantized=True)
def _goodput(cfg, hp):
  """Ours, v2: each client at its time-optimal batch
  ``sqrt(B_eff o_k v_k)`` (see ``docs/method.md``)."""
  return goodput_lib.goodput(
      hp["batch_size"], cfg.batch_min, cfg.batch_max, hp["local_steps"],
      hp["client_lr"], hp["ema_decay"], cfg.kernel_microbatch,
      max_gain=hp["max_gain"])


@reg.CONTROLLERS.register("displacement")
def _displacement(cfg, hp):
  """Ours, v3: a shared displacement budget ``Lambda = eta_k S_k`` set
  against the measured drift and the round's communication; each client at
  the batch that moves it fastest (see ``docs/method.md`` (f))."""
  return displacement_lib.displacement(
      hp["batch_size"], cfg.batch_min, cfg.batch_max, hp["local_steps"],
      hp["client_lr"], hp["ema_decay"], max_gain=hp["max_gain"],
      budget=hp["budget"], band=hp["budget_band"], guard=cfg.guard,
      patience=hp["anneal_patience"], scaling=cfg.rate_scaling)


def quantized(cfg) -> bool:
  """Whether the configured controller quantizes its batches to the
  kernel's microbatch (a property of its registration)."""
  return reg.CONTROLLERS.prop(cfg.controller, "quantized")


# --------------------------------------------------------------- schedules
# A schedule maps (b_0, batch_max, every, total rounds) to the batch of
# round r (a float, rounded and capped by the schedule controller).


@reg.SCHEDULES.register("step")
def _step(b0, batch_max, every, total_rounds):
  """x2 once, at round ``every``."""
  del batch_max, total_rounds
  return lambda r: jnp.where(r >= every, 2.0 * b0, b0)


@reg.SCHEDULES.register("linear")
def _linear(b0, batch_max, every, total_rounds):
  """A ramp from ``b_0`` to ``batch_max`` over the run."""
  del every
  return lambda r: b0 + jnp.clip(r / max(total_rounds - 1, 1), 0.0, 1.0) * (
      batch_max - b0)


@reg.SCHEDULES.register("doubling")
def _doubling(b0, batch_max, every, total_rounds):
  """x2 every ``every`` rounds (AdaBatch, Devarakonda et al. 2017)."""
  del batch_max, total_rounds
  return lambda r: b0 * 2.0 ** jnp.floor(r / every)


def make_controller(cfg, hp) -> controllers.Controller:
  """The configured controller, bounded by memory caps and the time
  budget (:func:`~fedjax_bsa.plans.controllers.clamp`)."""
  inner = reg.CONTROLLERS.get(cfg.controller)(cfg, hp)
  return controllers.clamp(
      inner, microbatch=cfg.kernel_microbatch if quantized(cfg) else None,
      time_budget=hp["time_budget"])


# -------------------------------------------------------------- local work


@reg.LOCAL_WORK.register("steps")
def _steps(cfg, hp):
  """A fixed number of local steps (FedScale's default protocol: 20)."""
  del cfg, hp
  return lambda plan, ctx, res, deadline, model_bytes: plan.steps


@reg.LOCAL_WORK.register("epochs", steps_from_epochs=True)
def _epochs(cfg, hp):
  """``ceil(local_epochs * n_k / b_k)`` steps (McMahan et al. 2017)."""
  del cfg

  def steps(plan, ctx, res, deadline, model_bytes):
    del res, deadline, model_bytes
    n = ctx.num_examples.astype(jnp.float32)
    b = jnp.maximum(plan.batch_size, 1).astype(jnp.float32)
    return jnp.maximum(jnp.ceil(hp["local_epochs"] * n / b), 1).astype(
        jnp.int32)
  return steps


@reg.LOCAL_WORK.register("deadline", needs_deadline=True)
def _deadline(cfg, hp):
  """The steps that fit the round's deadline (at most the plan's);
  0 where none fits (the client is dropped and counted)."""
  del cfg

  def steps(plan, ctx, res, deadline, model_bytes):
    del ctx
    # the plan's steps are local_steps for every controller but the
    # displacement one, whose budget sets them
    return deadline_lib.deadline_steps(res, plan.batch_size, deadline,
                                       model_bytes, plan.steps)
  return steps


# ------------------------------------------------------------- the pipeline


class RoundPlan(NamedTuple):
  """One experiment's decisions for one round (cohort of ``K``)."""
  plan: Plan                 # what runs (steps 0: not aggregated)
  planned_steps: jax.Array   # int32 [K], steps before the round policy
  outcome: policies.RoundOutcome
  deadline: jax.Array        # float32 [], the round's deadline (s)
  no_fit: jax.Array          # bool [K], available, but no step fits D


def decayed_lr(lr, round_, hp):
  """``max(lr_min, lr * lr_decay ** floor(round / lr_decay_every))``: a
  step decay of every client's rate (FedScale's, ``lr_decay = 1``: the rate
  unchanged); where ``lr`` itself is below ``lr_min`` it is kept.

  >>> hp = dict(lr_decay=0.5, lr_decay_every=2, lr_min=0.03)
  >>> [round(float(decayed_lr(0.2, r, hp)), 3) for r in range(8)]
  [0.2, 0.2, 0.1, 0.1, 0.05, 0.05, 0.03, 0.03]
  """
  k = (jnp.asarray(round_) // jnp.maximum(hp["lr_decay_every"], 1)).astype(
      jnp.float32)
  lr = jnp.asarray(lr, jnp.float32)
  decayed = lr * jnp.asarray(hp["lr_decay"], jnp.float32) ** k
  return jnp.where(decayed < lr, jnp.maximum(decayed, hp["lr_min"]), lr)


def plan_round(cfg, hp, controller, feedback, ctrl_state,
               ctx: controllers.Context, res, available, model_bytes: int
               ) -> tuple[RoundPlan, Any]:
  """Runs the pipeline of the module docstring for one experiment.

  Args:
    cfg: the settings (static choices).
    hp: the traced settings of this experiment.
    controller: from :func:`make_controller`.
    feedback: the last round's :class:`~fedjax_bsa.plans.controllers.Feedback`.
    ctrl_state: the controller's state.
    ctx: the coming round's :class:`~fedjax_bsa.plans.controllers.Context`.
    res: the cohort's :class:`~fedjax_bsa.setup.resources.ClientResources` [K].
    available: bool [K], who is available this round.
    model_bytes: bytes sent each way.

  Returns:
    ``(RoundPlan, controller state)``.
  """
  plan, ctrl_state = controller.update(feedback, ctrl_state, ctx)
  b = jnp.maximum(plan.batch_size, 1).astype(jnp.int32)
  plan = plan._replace(batch_size=b, lr=decayed_lr(plan.lr, ctx.round, hp))
  predicted = deadline_lib.one_epoch_time(res, b, ctx.num_examples,
                                          model_bytes)
  D = reg.DEADLINE_RULES.get(cfg.deadline_rule)(cfg, hp)(predicted,
                                                         available)
  steps = reg.LOCAL_WORK.get(cfg.local_work)(cfg, hp)(plan, ctx, res, D,
                                                      model_bytes)
  steps = clock.steps_within_compute(res, b, hp["time_budget"], steps)
  no_fit = available & (steps <= 0)
  outcome = reg.ROUND_POLICIES.get(cfg.round_policy)(cfg, hp)(
      res, b, steps, available, model_bytes, D)
  run = plan._replace(steps=outcome.steps)
  outcome = outcome._replace(dropped=outcome.dropped | no_fit)
  return RoundPlan(run, steps.astype(jnp.int32), outcome,
                   jnp.asarray(D, jnp.float32), no_fit), ctrl_state
