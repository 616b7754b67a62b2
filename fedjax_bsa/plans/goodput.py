"""Time-optimal batch sizes: the batch that buys progress fastest.

Under McCandlish et al. (2018) the steps to a given loss at batch ``b`` are
``S(b) = S_min (1 + B / b)``; on a client of ``n`` rows, which draws its
batches without replacement, ``B / b`` becomes ``B c_eff(b, n)``
(:func:`fedjax_bsa.kernel.noise.fpc_coefficient`). A step of client ``k`` costs
``o_k + b / v_k`` simulated seconds (``fedjax_bsa.plans.clock``), so the time to
a given loss is

  T(b) = S_min (1 + B c_eff(b, n)) (o + b / v),

minimal at :func:`time_optimal_batch` (``sqrt(B o v)`` for an infinite
client). The same batch maximises the progress a round buys when a deadline
fixes the compute time and the client runs the steps that fit.
:func:`goodput` is the per-client controller built on it and
:func:`headroom` bounds what any per-client batch can gain over the best
common batch. Derivations: ``docs/method.md`` (c) and (e).

References:
  McCandlish, Kaplan, Amodei and the OpenAI Dota team (2018), An Empirical
  Model of Large-Batch Training, arXiv:1812.06162.
  Johnson, Agrawal, Gu and Guestrin (2020), AdaScale SGD, ICML.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from fedjax_bsa.kernel import noise
from fedjax_bsa.plans import controllers
from fedjax_bsa.plans import pieces

__all__ = ["time_per_progress", "time_optimal_batch", "headroom",
           "deadline_headroom", "goodput"]

Plan = controllers.Plan


def time_per_progress(batch, b_simple, n, overhead, speed):
  """Simulated seconds per noise-free step: ``(1 + B c_eff(b, n))(o + b/v)``.

  ``T(b) / S_min``: a step of batch ``b`` is worth ``1 / (1 + B c_eff)``
  steps of the noise-free gradient (McCandlish et al. 2018) and costs
  ``o + b / v`` seconds.

  Args:
    batch: ``b >= 1``, any shape.
    b_simple: ``B = tr(Sigma) / |G|^2`` (population covariance).
    n: rows held (``inf`` allowed).
    overhead: ``o``, seconds per step.
    speed: ``v``, examples per second. (All broadcastable.)

  Returns:
    float32 seconds, of the broadcast shape.

  >>> float(time_per_progress(4, 4.0, jnp.inf, 1.0, 4.0))   # (1 + 1)(1 + 1)
  4.0
  """
  b = jnp.asarray(batch, jnp.float32)
  noisy = 1.0 + jnp.maximum(jnp.asarray(b_simple, jnp.float32), 0.0) * (
      noise.fpc_coefficient(b, n))
  return (noisy * (jnp.asarray(overhead, jnp.float32)
                   + b / jnp.asarray(speed, jnp.float32))).astype(jnp.float32)


def time_optimal_batch(b_simple, n, overhead, speed):
  """The batch minimising ``T(b) = S_min (1 + B c_eff(b, n)) (o + b / v)``.

  For ``b <= n``, ``1 + B c_eff(b, n) = a + B' / b`` with
  ``B' = B n / (n - 1)`` and ``a = 1 - B / (n - 1)``, so
  ``T / S_min = a o + B' / v + a b / v + B' o / b``. If ``a > 0`` it is
  convex with its minimum at

    b* = sqrt(B' o v / a) = sqrt(B o v / (1 - (1 + B) / n)),

  which tends to McCandlish et al.'s ``sqrt(B o v)`` as ``n`` grows. If
  ``a <= 0`` (``B >= n - 1``: noise so large that only the full client helps)
  ``T`` decreases on all of ``(0, n]``, and ``b* = n``. Batches above ``n``
  never help (``T(b) >= S_min (o + b / v) > T(n)``), so ``b* <= n``. The
  result is continuous, clipped to ``[1, max(n, 1)]``; by convexity the best
  integer batch is its floor or its ceiling. Derivation:
  ``docs/method.md`` (c).

  Args:
    b_simple: ``B``, float ``[K]`` (any shape).
    n: rows each client holds (``inf``: an infinite client).
    overhead: ``o``, seconds per step.
    speed: ``v``, examples per second. (All broadcastable.)

  Returns:
    float32 ``b*`` of the broadcast shape.

  >>> b = time_optimal_batch(jnp.array([16.0, 16.0, 16.0]),
  ...                        jnp.array([jnp.inf, 1e9, 10.0]), 1.0, 64.0)
  >>> [round(float(x), 2) for x in b]     # sqrt(16 * 64); the whole client
  [32.0, 32.0, 10.0]
  """
  b_s = jnp.maximum(jnp.asarray(b_simple, jnp.float32), 0.0)
  n = jnp.asarray(n, jnp.float32)
  o = jnp.asarray(overhead, jnp.float32)
  v = jnp.asarray(speed, jnp.float32)
  a = 1.0 - (1.0 + b_s) / jnp.maximum(n, 1.0)   # n = inf: 1
  interior = jnp.sqrt(b_s * o * v / jnp.where(a > 0, a, 1.0))
  best = jnp.where(a > 0, jnp.minimum(interior, n), n)
  return jnp.clip(best, 1.0, jnp.maximum(n, 1.0)).astype(jnp.float32)


def _client_grid(b_simple, n, overhead, speed, comm, batches):
  """The clients' arrays broadcast to ``[K]`` (float64), the batch grid
  ``[J]`` (checked) and ``c_eff(b, n_k)`` on it ``[K, J]``."""
  args = [np.asarray(x, np.float64) for x in (b_simple, n, overhead, speed,
                                             comm)]
  bs, nn, o, v, c = np.broadcast_arrays(*args)
  grid = np.asarray(batches, np.float64).reshape(-1)
  if grid.size == 0 or (grid < 1).any():
    raise ValueError(f"batches={batches!r} is not allowed: give a non-empty "
                     "grid of batches >= 1")
  coef = np.asarray(noise.fpc_coefficient(grid[None, :], nn[:, None]),
                    np.float64)                                   # [K, J]
  return bs, o, v, c, grid, coef


def headroom(b_simple, n, overhead, speed, comm, steps_ref, batches) -> float:
  """How much per-client batches can shorten a round, at most.

  A synchronous round that delivers ``steps_ref`` noise-free steps on every
  client takes ``T_k(b) = comm_k + steps_ref (1 + B_k c_eff(b, n_k))
  (o_k + b / v_k)`` on client ``k`` and ``max_k T_k`` in all. Headroom is the
  best round with one common batch over the best with each client at its own
  batch:

    headroom = min_b max_k T_k(b) / max_k min_b T_k(b)   (>= 1),

  with ``b`` over the candidate grid ``batches``. It is 1 for identical
  clients and whenever the slowest client's own best batch suits everyone.
  (This project's definition, on the step model of McCandlish et al. 2018.)
  Host-side numpy (float64 times; ``c_eff`` from the float32
  :func:`fedjax_bsa.kernel.noise.fpc_coefficient`); ``docs/method.md`` (e).

  Args:
    b_simple: ``B_k``, float ``[K]``.
    n: rows ``[K]`` (``inf`` allowed).
    overhead: ``o_k`` seconds per step ``[K]``.
    speed: ``v_k`` examples per second ``[K]``.
    comm: ``comm_k`` seconds per round ``[K]``.
    steps_ref: noise-free steps each client delivers, scalar.
    batches: candidate batches ``[J]`` (e.g. ``1..b_max``).

  Returns:
    The ratio, a Python float.

  >>> h = headroom([3.0, 0.0], [4, 4], [1.0, 0.0], [1.0, 0.5], [0.0, 0.0],
  ...              1, [1, 2, 4])   # own best: 5 and 2; common best: 6 (b = 2)
  >>> round(h, 6)
  1.2
  """
  bs, o, v, c, grid, coef = _client_grid(b_simple, n, overhead, speed, comm,
                                         batches)
  t = c[:, None] + float(steps_ref) * (1.0 + np.maximum(bs, 0)[:, None] * coef
                                       ) * (o[:, None] + grid[None] / v[:, None])
  common = t.max(axis=0).min()
  own = t.min(axis=1).max()
  return float(common / own)


def deadline_headroom(b_simple, n, overhead, speed, comm, deadline,
                      max_steps, batches) -> float:
  """How much per-client batches can add to a deadline round, at most.

  With the round fixed at ``deadline`` seconds, client ``k`` at batch ``b``
  runs ``s_k(b) = min(floor((D - comm_k) / (o_k + b / v_k)), max_steps)``
  steps and makes ``P_k(b) = s_k(b) / (1 + B_k c_eff(b, n_k))`` noise-free
  steps of progress. Headroom is the round's progress with each client at
  its own best batch over the best with one common batch:

    headroom = sum_k max_b P_k(b) / max_b sum_k P_k(b)   (>= 1),

  (``docs/method.md`` (e); this project's definition). Clients that fit no
  step contribute nothing either way.

  Args: as :func:`headroom`, with ``deadline`` (seconds) and ``max_steps``
  (the protocol's cap) instead of ``steps_ref``.

  An overhead-bound fast client (``o = 1``, ``v = 100``) wants batch 8, a
  compute-bound one (``o = 0``, ``v = 1``) batch 1 (``B = 4``, 16 s):

  >>> h = deadline_headroom([4.0, 4.0], [1000, 1000], [1.0, 0.0],
  ...                       [100.0, 1.0], [0.0, 0.0], 16.0, 100, [1, 2, 4, 8])
  >>> round(h, 3)
  1.174
  """
  bs, o, v, c, grid, coef = _client_grid(b_simple, n, overhead, speed, comm,
                                         batches)
  steps = np.floor(np.maximum(float(deadline) - c[:, None], 0.0)
                   / (o[:, None] + grid[None] / v[:, None]))
  steps = np.minimum(steps, float(max_steps))
  prog = steps / (1.0 + np.maximum(bs, 0)[:, None] * coef)
  common = prog.sum(axis=0).max()
  own = prog.max(axis=1).sum()
  return float(own / common) if common > 0 else 1.0


def goodput(batch_size, batch_min, batch_max, local_steps: int, client_lr,
            ema_decay, microbatch: int, use_gain: bool = True,
            max_gain=4.0) -> controllers.Controller:
  """Ours: each client at its time-optimal batch.

  ``b_k = clip(time_optimal_batch(B_k, n_k, o_k, v_k), low, cap_k)``,
  quantized to the kernel's microbatch (:func:`controllers.quantize`), with
  ``low = max(batch_min, 2 microbatch)`` (every step yields a noise
  estimate) and ``cap_k = min(batch_max, memory_cap_k, max(n_k, low))``.
  ``B_k`` is the client's smoothed noise scale, or the cohort's for a client
  not yet seen (:func:`controllers.client_noise_scales`, the same EMAs as
  :func:`controllers.noise_scale`); before any estimate the batch is
  ``batch_size``. Learning rate ``client_lr * min(r_k, max_gain)``, ``r_k``
  the finite-client AdaScale gain of ``b_k`` over ``batch_size``
  (:func:`controllers.adascale_gain`). Steps are ``local_steps``: a
  round-deadline rule sets them afterwards (outside the controller). Needs
  ``Context.num_examples``, ``speed`` and ``step_overhead``.

  Args:
    batch_size: reference batch ``b_0`` (the learning rate is tuned for it).
    batch_min: smallest batch (raised to two microbatches).
    batch_max: largest batch.
    local_steps: local steps.
    client_lr: learning rate at ``b_0``.
    ema_decay: EMA decay of the per-client estimates.
    microbatch: the kernel's ``mu``.
    use_gain: scale the learning rate by the AdaScale gain.
    max_gain: cap on the gain.

  Returns:
    A :class:`controllers.Controller` with :class:`controllers.NoiseState`.

  >>> ctrl = goodput(8, 8, 64, 5, 0.1, 0.9, 4)
  >>> ctx = controllers.Context(jnp.int32(0), jnp.array([0, 1]),
  ...     jnp.array([100.0, 100.0]), jnp.array([0.1, 0.1]),
  ...     jnp.array([64, 64]), None, jnp.array([50, 50]))
  >>> plan, _ = ctrl.update(controllers.empty_feedback(2), ctrl.init(3), ctx)
  >>> plan.batch_size.tolist(), plan.steps.tolist()   # nothing known yet
  ([8, 8], [5, 5])
  """
  low = max(int(batch_min), 2 * int(microbatch))
  return pieces.chain(
      pieces.noise_estimate(ema_decay),
      time_optimal_target(batch_size),
      pieces.round_batch(low, batch_max, microbatch, client_caps=True),
      pieces.adascale_rate(client_lr, batch_size, max_gain, use_gain),
      pieces.fixed_steps(local_steps))


def time_optimal_target(batch_size) -> pieces.Piece:
  """Batch target: each client's time-optimal batch
  (:func:`time_optimal_batch`, its own ``o_k``, ``v_k`` and rows),
  ``batch_size`` before any estimate. Needs ``Context.num_examples``."""

  def update(d: pieces.Draft, ctx):
    if ctx.num_examples is None:
      raise ValueError("goodput needs Context.num_examples (rows per client)"
                       ", got None")
    best = time_optimal_batch(d.b_simple, pieces.rows(ctx),
                              ctx.step_overhead, ctx.speed)
    return d._replace(batch=jnp.where(
        d.estimated, best, jnp.asarray(batch_size, jnp.float32)))

  return pieces.stateless(update)
