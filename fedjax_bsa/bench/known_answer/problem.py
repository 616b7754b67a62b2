"""A known-answer check of the displacement controller (v3).

Two clients, least squares, with the between-client heterogeneity ``zeta``
and the sampling noise ``sigma`` set by construction: client ``k`` holds
``n`` rows ``x = D_k z`` (``z ~ N(0, I_d)``, ``D_1`` and ``D_2`` stretch
opposite halves of the coordinates, so the clients' Hessians differ) and
labels ``y = x . w_k* + sigma eps`` with ``w_{1,2}* = w* +- zeta u``. With
equal Hessians FedAvg would have no client drift whatever ``zeta``; with
these it converges to a point off the global optimum by an amount that
grows with the local work and ``zeta`` (Wang et al. 2021, "A Field Guide
to Federated Optimization", sec. 3; Karimireddy et al. 2020).

Local SGD is run exactly (minibatches are windows of a per-round
permutation, as in the round kernel), with every statistic the controller
reads computed exactly from per-example gradients: the full gradient's
squared norm and the per-example covariance trace at each step, the mean
applied gradient. A round costs ``C + max_k S_k (o + b_k / v)`` simulated
seconds. The global loss ``F`` and its optimum ``F*`` are exact.

:func:`grid_times` runs every fixed ``(b, eta, S)`` of a grid in one
vmapped program and :func:`controller_time` runs v3 from the grid's
middle point; each returns simulated seconds until ``F - F* <= tol (F(w_0)
- F*)``. :func:`seed_study` compares them over several problem seeds with
the fixed setting tuned on its median; ``python -m
fedjax_bsa.bench.known_answer`` (:mod:`fedjax_bsa.bench.known_answer.main`)
prints it for small and large ``zeta``.
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_bsa.kernel import ClientStats
from fedjax_bsa.plans import controllers
from fedjax_bsa.plans import displacement

__all__ = ["Problem", "make_problem", "grid_times", "controller_time",
           "seed_study", "GRID", "ANNEAL"]

#: The fixed settings compared: batch x learning rate x local steps.
GRID = dict(batch=(2, 8, 32), lr=(0.025, 0.05, 0.1, 0.2),
            steps=(2, 5, 10, 20, 40, 80))
#: v3 starts from the grid's middle point and is not tuned.
REFERENCE = dict(batch=8, lr=0.05, steps=10)
S_MAX = 160        # static bound of local steps (v3: 4 x band x S_0)
B_MAX = 32
ROUNDS = 400
OVERHEAD, SPEED, COMM = 0.01, 1000.0, 0.5   # s/step, examples/s, s/round
TOL = 1e-3         # target: F - F* <= TOL (F(0) - F*)
#: v3's ``anneal_patience`` here: 3 (annealing on). The default setting is
#: 0 (off): annealing reaches this problem's noise floor but misfired on
#: the pilot's noisy non-IID cohorts (docs/method.md (f)).
ANNEAL = 3


class Problem(NamedTuple):
  x: jax.Array        # [2, n, d]
  y: jax.Array        # [2, n]
  w_star: jax.Array   # [d], the global optimum
  f_star: jax.Array   # [], F(w_star)
  f0: jax.Array       # [], F(0)


def make_problem(zeta: float, sigma: float = 0.5, n: int = 256, d: int = 10,
                 seed: int = 0) -> Problem:
  """The two clients of the module docstring."""
  rng = np.random.default_rng(seed)
  half = d // 2
  scale = np.array([2.0] * half + [0.5] * (d - half))
  dk = np.stack([scale, scale[::-1]])                      # [2, d]
  z = rng.standard_normal((2, n, d))
  x = z * dk[:, None, :]
  w0 = rng.standard_normal(d)
  u = rng.standard_normal(d)
  u /= np.linalg.norm(u)
  opt = np.stack([w0 + zeta * u, w0 - zeta * u])
  y = np.einsum("knd,kd->kn", x, opt) + sigma * rng.standard_normal((2, n))
  xs, ys = x.reshape(-1, d), y.reshape(-1)
  w_star = np.linalg.lstsq(xs, ys, rcond=None)[0]
  f = lambda w: 0.5 * np.mean((xs @ w - ys) ** 2)
  return Problem(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32),
                 jnp.asarray(w_star, jnp.float32), jnp.float32(f(w_star)),
                 jnp.float32(f(np.zeros(d))))


def _loss(p: Problem, w):
  r = jnp.einsum("knd,d->kn", p.x, w) - p.y
  return 0.5 * jnp.mean(r * r)


def _local(p: Problem, k, w, batch, lr, steps, perm, max_steps: int = S_MAX):
  """Client ``k``'s local SGD and its exact statistics (``max_steps``: the
  static loop bound, at least ``steps``)."""
  xk, yk = p.x[k], p.y[k]
  n = xk.shape[0]

  def body(t, carry):
    w, loss, gsq, tr = carry
    live = t < steps
    pos = (t * batch + jnp.arange(B_MAX)) % n
    rows = perm[pos]
    valid = jnp.arange(B_MAX) < batch
    r = xk[rows] @ w - yk[rows]
    g = jnp.sum(jnp.where(valid[:, None], xk[rows] * r[:, None], 0.0),
                0) / batch
    per = xk * (xk @ w - yk)[:, None]                     # [n, d]
    full = per.mean(0)
    cov = jnp.mean(jnp.sum((per - full) ** 2, -1))
    bl = jnp.sum(jnp.where(valid, 0.5 * r * r, 0.0)) / batch
    f = live.astype(jnp.float32)
    return (jnp.where(live, w - lr * g, w), loss + f * bl,
            gsq + f * jnp.sum(full ** 2), tr + f * cov)

  z = jnp.float32(0.0)
  w_end, loss, gsq, tr = jax.lax.fori_loop(0, max_steps, body,
                                           (w, z, z, z))
  s = jnp.maximum(steps, 1).astype(jnp.float32)
  h = (w - w_end) / (lr * s)
  stats = ClientStats(loss / s, (batch * steps).astype(jnp.int32),
                      steps.astype(jnp.int32), gsq / s, tr / s,
                      steps.astype(jnp.int32), jnp.sum(h * h))
  return w_end - w, h, stats


def _round(p: Problem, w, batch, lr, steps, key, max_steps: int = S_MAX):
  """One FedAvg round of both clients (equal weights): ``(w, stats,
  |h_1 + h_2|^2, round seconds)``."""
  n = p.x.shape[1]
  perms = jax.vmap(lambda k: jax.random.permutation(k, n))(
      jax.random.split(key, 2))
  deltas, hs, stats = jax.vmap(
      lambda k, b, e, s, pm: _local(p, k, w, b, e, s, pm, max_steps))(
          jnp.arange(2), batch, lr, steps, perms)
  usum = jnp.sum(hs.sum(0) ** 2)
  secs = COMM + jnp.max(steps * (OVERHEAD + batch / SPEED))
  return w + deltas.mean(0), stats, usum, secs


def _time_to(gap, secs, tol):
  """Seconds until the gap first falls to ``tol`` (inf if never)."""
  hit = gap <= tol
  t = jnp.cumsum(secs)
  first = jnp.argmax(hit)
  return jnp.where(hit.any(), t[first], jnp.inf)


@functools.partial(jax.jit, static_argnames=("rounds",))
def _fixed(p: Problem, batch, lr, steps, key, tol, rounds: int = ROUNDS):
  d = p.x.shape[-1]
  b2, e2, s2 = (jnp.full((2,), v) for v in (batch, lr, steps))

  def body(w, k):
    # the grid's largest steps bound the loop (steps past it are no-ops)
    w, _, _, secs = _round(p, w, b2, e2, s2, k, max(GRID["steps"]))
    return w, ((_loss(p, w) - p.f_star) / (p.f0 - p.f_star), secs)

  _, (gap, secs) = jax.lax.scan(body, jnp.zeros((d,), jnp.float32),
                                jax.random.split(key, rounds))
  return _time_to(gap, secs, tol)


def grid_times(p: Problem, tol: float = TOL, seed: int = 0) -> dict:
  """Seconds to the target of every fixed ``(b, eta, S)`` in :data:`GRID`."""
  pts = list(itertools.product(GRID["batch"], GRID["lr"], GRID["steps"]))
  arr = [jnp.asarray([q[i] for q in pts]) for i in range(3)]
  t = jax.vmap(lambda b, e, s: _fixed(p, b, e.astype(jnp.float32), s,
                                      jax.random.key(seed), tol))(*arr)
  return {q: float(v) for q, v in zip(pts, np.asarray(t))}


@functools.partial(jax.jit, static_argnames=("rounds", "lr", "guard",
                                             "patience"))
def _v3(p: Problem, key, tol, rounds: int = ROUNDS, lr: float | None = None,
        guard: str = "backoff", patience: int = ANNEAL):
  d = p.x.shape[-1]
  ref = REFERENCE
  ctrl = displacement.displacement(ref["batch"], 1, B_MAX, ref["steps"],
                                   ref["lr"] if lr is None else lr, 0.9,
                                   guard=guard, patience=patience)
  cohort = jnp.arange(2, dtype=jnp.int32)
  n = jnp.full((2,), p.x.shape[1], jnp.int32)
  ctx0 = controllers.Context(
      jnp.int32(0), cohort, jnp.full((2,), SPEED), jnp.full((2,), OVERHEAD),
      jnp.full((2,), B_MAX, jnp.int32), None, n, jnp.full((2,), COMM))

  def body(carry, k):
    w, fb, st, r = carry
    plan, st = ctrl.update(fb, st, ctx0._replace(round=r))
    steps = jnp.minimum(plan.steps, S_MAX)
    w, stats, usum, secs = _round(p, w, plan.batch_size, plan.lr, steps, k)
    fb = controllers.Feedback(cohort, stats, usum)
    gap = (_loss(p, w) - p.f_star) / (p.f0 - p.f_star)
    return (w, fb, st, r + 1), (gap, secs, plan.batch_size.mean(),
                                (plan.lr * steps).mean())

  init = (jnp.zeros((d,), jnp.float32), controllers.empty_feedback(2),
          ctrl.init(2), jnp.int32(0))
  _, (gap, secs, b, lam) = jax.lax.scan(body, init,
                                        jax.random.split(key, rounds))
  return _time_to(gap, secs, tol), secs, b, lam, gap


def controller_time(p: Problem, tol: float = TOL, seed: int = 0,
                    lr: float | None = None, guard: str = "backoff",
                    patience: int = ANNEAL) -> dict:
  """v3's seconds to the target, its mean batch and ``eta S`` over the
  rounds up to it (all rounds if it never gets there), and the final gap
  (``lr``: the reference rate, default :data:`REFERENCE`'s)."""
  t, secs, b, lam, gap = (np.asarray(a) for a in _v3(
      p, jax.random.key(seed), tol, lr=lr, guard=guard, patience=patience))
  upto = int(np.searchsorted(np.cumsum(secs), float(t))) + 1
  return dict(seconds=float(t), rounds=upto,
              mean_batch=float(np.mean(b[:upto])),
              mean_budget=float(np.mean(lam[:upto])),
              final_gap=float(gap[-1]))


def seed_study(zeta: float, seeds=range(5), tol: float = TOL,
               patience: int = ANNEAL) -> dict:
  """v3 against the fixed grid over several problem seeds (the SGD seed is
  the problem's), tuned the way the study tunes: the best fixed setting is
  the one with the lowest median time over the seeds, one setting for all
  of them (the per-seed best of 72 noisy times is a winner's curse: near a
  noise floor the first hit of the target is partly luck).

  Returns ``best`` (the setting), ``best_seconds`` (its median),
  ``v3_seconds`` (v3's median), ``ratio`` (their quotient: >= 0.8 is
  within 1.25x), ``oracle`` (per seed, the best of the 72 over v3's time),
  ``hits`` (seeds where v3 reached the target), v3's mean ``budget`` and
  ``batch`` per seed, and the best setting's ``eta S``.
  """
  grids, v3 = [], []
  for s in seeds:
    p = make_problem(zeta, seed=s)
    grids.append(grid_times(p, tol, seed=s))
    v3.append(controller_time(p, tol, seed=s, patience=patience))
  med = {k: float(np.median([g[k] for g in grids])) for k in grids[0]}
  best = min(med, key=med.get)
  secs = [v["seconds"] for v in v3]
  v3_med = float(np.median(secs))
  return dict(best=best, best_seconds=med[best], v3_seconds=v3_med,
              ratio=med[best] / v3_med, best_budget=best[1] * best[2],
              oracle=[min(g.values()) / t for g, t in zip(grids, secs)],
              hits=int(np.isfinite(secs).sum()),
              budget=[v["mean_budget"] for v in v3],
              batch=[v["mean_batch"] for v in v3])
