"""Round-deadline rules: how long the server waits for a cohort each round.

Pure ``jax.numpy`` functions over a cohort's ``[K]`` arrays (a
:class:`~fedjax_bsa.setup.resources.ClientResources` gathered with
``jax.tree.map(lambda a: a[ids], res)``), jittable and vmappable over
experiments (e.g. over a batch of deadlines or quantiles); the caller owns the
``jit`` boundary. The rule is static; every number may be traced.

A round under a deadline rule:

1. predict each selected client's time for one local epoch with its planned
   batch (:func:`one_epoch_time`);
2. set the deadline from the available clients' predictions with the
   configured rule; the built-in rules register themselves here in
   :data:`~fedjax_bsa.core.registry.DEADLINE_RULES` (:func:`fixed_deadline`,
   :func:`quantile_deadline`, :func:`fedbalancer_deadline`), and
   :func:`round_deadline` looks one up by name;
3. give each client the local steps that fit the deadline
   (:func:`deadline_steps`); a client with 0 steps is dropped, and the caller
   counts it.

:func:`compute_comm_ratio` tells which regime a run is in (local compute
versus communication time). The ``check_*`` helpers validate a
configuration eagerly, with messages that name the setting (``deadline``,
``deadline_quantile``), its value and the allowed range; the registry
refuses an unknown ``deadline_rule``, naming the registered ones.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp

from fedjax_bsa.core import registry as reg
from fedjax_bsa.core.types import ClientResources
from fedjax_bsa.plans import clock

__all__ = ["check_deadline_seconds", "check_quantile", "compute_comm_ratio",
           "deadline_steps", "fedbalancer_deadline", "fixed_deadline",
           "one_epoch_time", "quantile_deadline", "round_deadline"]

ArrayLike = jax.typing.ArrayLike

# Relative slack when turning quantile * count into an order-statistic rank:
# q * m within 2**-20 (relative) of an integer counts as that integer, so a
# float32 product such as 0.3 * 10 = 3.0000001 still selects the 3rd time.
_RANK_RTOL = 2.0**-20


# ------------------------------------------------------------- validation ---

def _concrete(x: Any) -> Optional[float]:
  """``float(x)`` for a concrete scalar; None for a tracer (not checkable)."""
  if isinstance(x, jax.core.Tracer):
    return None
  return float(x)


def check_quantile(quantile: Any) -> float:
  """Returns ``quantile`` as a float if it lies in (0, 1], else raises.

  Args:
    quantile: the ``deadline_quantile`` setting.

  Returns:
    ``float(quantile)``.

  Raises:
    ValueError: not a finite number in (0, 1].

  Example:
    >>> check_quantile(0.8)
    0.8
  """
  try:
    ok = not isinstance(quantile, (bool, str)) and 0.0 < float(quantile) <= 1.0
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ValueError(f"deadline_quantile={quantile!r} is invalid; allowed "
                     "range: (0, 1].")
  return float(quantile)


def check_deadline_seconds(seconds: Any) -> float:
  """Returns the fixed rule's ``seconds`` if finite and > 0, else raises.

  Args:
    seconds: the ``deadline`` setting (simulated seconds).

  Returns:
    ``float(seconds)``.

  Raises:
    ValueError: missing, zero, negative or not finite.

  Example:
    >>> check_deadline_seconds(30)
    30.0
  """
  try:
    ok = (seconds is not None and not isinstance(seconds, (bool, str))
          and math.isfinite(float(seconds)) and float(seconds) > 0.0)
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ValueError(f"deadline={seconds!r} is invalid for "
                     "deadline_rule='fixed'; allowed range: finite and > 0 "
                     "(simulated seconds).")
  return float(seconds)


# ---------------------------------------------------------------- timing ---

def one_epoch_time(res: ClientResources, batch: ArrayLike,
                   num_examples: ArrayLike,
                   model_bytes: ArrayLike) -> jax.Array:
  """Predicted time of one local epoch plus the round's communication.

  ``ceil(n_k / b_k) * (step_overhead_k + b_k / speed_k) + comm_k`` (a last,
  partial batch is charged as a full one), computed with
  :func:`fedjax_bsa.plans.clock.client_time`.

  Args:
    res: cohort resources, fields [K].
    batch: examples per step, scalar or [K], >= 1.
    num_examples: client dataset sizes ``n_k``, scalar or [K], >= 0.
    model_bytes: bytes sent each way, scalar.

  Returns:
    float32 [K], simulated seconds (just the communication where
    ``n_k == 0``).

  Example:
    >>> from fedjax_bsa.setup.resources import make_resources
    >>> res = make_resources("uniform", 2, 0, base_speed=10.0,
    ...                      step_overhead=0.5, bandwidth=1e3)
    >>> one_epoch_time(res, 10, jnp.array([25, 30]), 1000).tolist()
    [6.5, 6.5]
  """
  b = jnp.maximum(jnp.asarray(batch, jnp.int32), 1)
  n = jnp.asarray(num_examples, jnp.int32)
  steps = (n + b - 1) // b
  return clock.client_time(res, b, steps, model_bytes)


# ---------------------------------------------------------------- rules ---
# Each rule is registered in :data:`~fedjax_bsa.core.registry.DEADLINE_RULES`
# as a factory ``(cfg, hparams) -> rule(predicted [K], active [K])``; it reads
# the traced settings ``hparams["deadline"]`` and
# ``hparams["deadline_quantile"]``. Clients with ``active`` false
# (unavailable, or not selected) are ignored. A concrete setting is
# validated when the rule is built (see :func:`check_deadline_seconds`,
# :func:`check_quantile`); a traced one (under ``jit``/``vmap``) cannot be,
# so validate the configuration eagerly first.


def _cohort(predicted: ArrayLike, active: ArrayLike):
  """``(times float32 [K], active bool [K])``."""
  times = jnp.asarray(predicted, jnp.float32)
  return times, jnp.broadcast_to(jnp.asarray(active, jnp.bool_), times.shape)


@reg.DEADLINE_RULES.register("fixed", takes_deadline=True)
def fixed_deadline(cfg, hparams):
  """``deadline`` seconds, whatever the cohort (also with no active client).

  >>> rule = fixed_deadline(None, {"deadline": 30.0})
  >>> rule(jnp.array([2.0, 90.0]), True).tolist()
  30.0
  """
  del cfg
  seconds = hparams["deadline"]
  if seconds is None or _concrete(seconds) is not None:
    check_deadline_seconds(seconds)

  def rule(predicted, active):
    del predicted, active
    return jnp.asarray(seconds, jnp.float32)
  return rule


@reg.DEADLINE_RULES.register("quantile")
def quantile_deadline(cfg, hparams):
  """The ``deadline_quantile``-quantile ``q`` of the active clients'
  predicted times, as an order statistic: the ``ceil(q * m)``-th smallest of
  the ``m`` active times (numpy's ``"inverted_cdf"`` quantile), so at least
  a fraction ``q`` of the active clients are predicted to make it; ``q = 1``
  waits for the slowest. 0.0 with no active client (nobody to wait for).

  >>> rule = quantile_deadline(None, {"deadline_quantile": 0.5})
  >>> rule(jnp.array([2.0, 3.0, 4.0, 10.0]), True).tolist()
  3.0
  """
  del cfg
  q = hparams["deadline_quantile"]
  if q is None or _concrete(q) is not None:
    check_quantile(q)

  def rule(predicted, active):
    times, active = _cohort(predicted, active)
    if times.size == 0:  # an empty cohort: nobody to wait for
      return jnp.float32(0.0)
    m = jnp.sum(active).astype(jnp.float32)
    sorted_times = jnp.sort(jnp.where(active, times, jnp.inf))
    rank = jnp.ceil(jnp.asarray(q, jnp.float32) * m * (1.0 - _RANK_RTOL))
    rank = jnp.clip(rank, 1.0, jnp.maximum(m, 1.0)).astype(jnp.int32)
    return jnp.where(m > 0, sorted_times[rank - 1], 0.0)
  return rule


@reg.DEADLINE_RULES.register("fedbalancer")
def fedbalancer_deadline(cfg, hparams):
  """FedBalancer's deadline (Shin et al., "FedBalancer: Data and Pace
  Control for Efficient Federated Learning on Heterogeneous Clients",
  MobiSys 2022, Algorithm 4 ``findPeakDDLE`` in the authors' code): the
  deadline ``D`` maximizing the number of active clients predicted to finish
  by ``D``, divided by ``D``. 0.0 with no active client.

  Between two predicted times the count is constant and ``1 / D`` falls, so
  the maximum over all ``D > 0`` is at one of the active clients' predicted
  times; those are the candidates, and a tie goes to the smallest ``D``. The
  authors' code scans whole seconds ``D = 1, 2, ...`` (so its ``D`` is a
  predicted time rounded up to a whole second) and, with ``E`` local
  epochs, sets the deadline to ``D_1 + (D_E - D_1) * ratio`` from the peaks
  ``D_1`` and ``D_E`` of the one-epoch and ``E``-epoch predictions,
  ``ratio`` in [0, 1] adapted from the training loss; a caller can build
  that from two calls to this rule.

  >>> rule = fedbalancer_deadline(None, {})
  >>> rule(jnp.array([2.0, 3.0, 4.0, 10.0]), True).tolist()  # 3/4 wins
  4.0
  """
  del cfg, hparams

  def rule(predicted, active):
    times, active = _cohort(predicted, active)
    if times.size == 0:  # an empty cohort: nobody to wait for
      return jnp.float32(0.0)
    sorted_times = jnp.sort(jnp.where(active, times, jnp.inf))
    done = jnp.searchsorted(sorted_times, sorted_times, side="right")
    rate = jnp.where(jnp.isfinite(sorted_times),
                     done.astype(jnp.float32) / sorted_times, -1.0)
    best = jnp.argmax(rate)  # first maximum: the smallest such deadline
    return jnp.where(jnp.any(active), sorted_times[best], 0.0)
  return rule


def round_deadline(rule: str, predicted: ArrayLike, active: ArrayLike, *,
                   seconds: Optional[ArrayLike] = None,
                   quantile: Optional[ArrayLike] = None) -> jax.Array:
  """The round's deadline under the registered rule named ``rule``
  (static), with the settings given as arguments: the rule is built from
  ``hparams = {"deadline": seconds, "deadline_quantile": quantile}`` (and no
  config, so a rule that reads its config needs its factory called).

  Args:
    rule: a name in :data:`~fedjax_bsa.core.registry.DEADLINE_RULES`.
    predicted: float [K], each client's predicted time, e.g. from
      :func:`one_epoch_time`; positive for active clients.
    active: bool [K], e.g. selected and available.
    seconds: the ``deadline`` setting (``"fixed"``: > 0).
    quantile: the ``deadline_quantile`` setting (``"quantile"``: in (0, 1]).

  Returns:
    float32 scalar, simulated seconds.

  Raises:
    ValueError: unknown rule (naming ``deadline_rule`` and the registered
      rules), or a missing or out-of-range setting the rule reads.

  Example:
    >>> t = jnp.array([2.0, 3.0, 4.0, 10.0])
    >>> round_deadline("quantile", t, True, quantile=0.5).tolist()
    3.0
  """
  make = reg.DEADLINE_RULES.get(rule)
  return make(None, {"deadline": seconds,
                     "deadline_quantile": quantile})(predicted, active)


def deadline_steps(res: ClientResources, batch: ArrayLike,
                   deadline: ArrayLike, model_bytes: ArrayLike,
                   max_steps: ArrayLike) -> jax.Array:
  """The local steps each client can take before the deadline, capped.

  ``min(clock.steps_within(res, batch, deadline, model_bytes), max_steps)``:
  a client with ``s`` steps fits the deadline (communication included) and,
  below the cap, ``s + 1`` steps would not (the test is
  :func:`fedjax_bsa.plans.clock.fits_within`).

  Args:
    res: cohort resources, fields [K].
    batch: examples per step, scalar or [K].
    deadline: seconds, scalar or [K].
    model_bytes: bytes sent each way, scalar.
    max_steps: cap, int scalar or [K] (e.g. the steps of ``E`` epochs).

  Returns:
    int32 [K]; 0 where not even one step (or the communication) fits: such
    clients are dropped, and the caller must count them.

  Example:
    >>> from fedjax_bsa.setup.resources import make_resources
    >>> res = make_resources("uniform", 1, 0, base_speed=100.0,
    ...                      step_overhead=0.5, bandwidth=1e3)
    >>> deadline_steps(res, 50, 10.0, 1000, max_steps=5).tolist()  # 8 fit
    [5]
  """
  steps = clock.steps_within(res, batch, deadline, model_bytes)
  return jnp.minimum(steps, jnp.asarray(max_steps, jnp.int32))


def compute_comm_ratio(res: ClientResources, batch: ArrayLike,
                       steps: ArrayLike, model_bytes: ArrayLike, *,
                       active: Optional[ArrayLike] = None) -> jax.Array:
  """Median over clients of local compute time / communication time.

  Says which regime a run is in: >> 1 compute-bound, << 1
  communication-bound.

  Args:
    res: cohort (or population) resources, fields [K].
    batch: examples per step, scalar or [K].
    steps: local steps, scalar or [K].
    model_bytes: bytes sent each way, scalar.
    active: optional bool [K]; the median is then over these clients only.

  Returns:
    float32 scalar, ``median_k(local_time_k / comm_time_k)`` (numpy's median:
    the mean of the two middle values for an even count); ``inf`` terms where
    communication is free; NaN if ``active`` selects nobody.

  Example:
    >>> from fedjax_bsa.setup.resources import make_resources
    >>> res = make_resources("uniform", 2, 0, base_speed=100.0,
    ...                      step_overhead=0.0, bandwidth=1e3)
    >>> compute_comm_ratio(res, 50, jnp.array([2, 6]), 500).tolist()  # 1, 3
    2.0
  """
  ratio = (clock.local_time(res, batch, steps)
           / clock.comm_time(res, model_bytes))
  ratio = jnp.broadcast_to(ratio, jnp.shape(res.speed))
  if active is None:
    return jnp.median(ratio).astype(jnp.float32)
  active = jnp.broadcast_to(jnp.asarray(active, jnp.bool_), ratio.shape)
  return jnp.nanmedian(jnp.where(active, ratio, jnp.nan)).astype(jnp.float32)
