"""The round kernel's lane loop, in named pieces (see :mod:`fedjax_bsa.kernel`
for the contract and ``docs/design.md`` for the layout).

* :func:`slot_step`: one lane computes one slot (``R`` microbatches of
  ``mu`` rows) of its current job: gradients, the step's update through the
  client transformation at a step's last slot, the noise estimate;
* :func:`job_end`: lanes that finished a job add it into the shared
  accumulators and reset to their next job (run under ``lax.cond`` only in
  slots where some lane finished one, outside the lane ``vmap``);
* :func:`run_lanes`: the lock-step ``fori_loop`` over slots.

Every function takes the static :class:`Spec` first; arrays come in a
:class:`Round` (what every lane reads), :class:`Lanes` (per-lane state,
leading ``[L]``) and :class:`Shared` (accumulators over jobs ``[J]`` and
experiments ``[E]``).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_bsa.data import federated
from fedjax_bsa.kernel import layout as layout_lib
from fedjax_bsa.kernel import noise

__all__ = ["Spec", "Round", "Lanes", "Shared", "SlotOut", "slot_step",
           "job_end", "run_lanes", "sq_norm"]

tmap = jax.tree.map


class Spec(NamedTuple):
  """Static settings of a kernel (closed over, never traced)."""
  loss_fn: Callable      # (params, x[B, ...], y[B]) -> [B]
  client_tx: Any         # optax.GradientTransformation
  client_init: Callable  # (server_params, client_input) -> client_tx state
  microbatch: int        # mu
  per_slot: int          # R
  experiments: int       # E
  noise_stats: bool
  client_deltas: bool


class Round(NamedTuple):
  """What every lane reads (replicated over a mesh)."""
  server: Any                # [E, ...] server parameters
  data: federated.FederatedData
  jobs: Any                  # kernel.Jobs of [J] arrays
  inputs: Any                # [J, ...] client inputs, or None
  slots_per_step: jax.Array  # int32 [J]
  layout: layout_lib.Layout


class Lanes(NamedTuple):
  """Per-lane loop state (leading axis ``[L]`` on every leaf)."""
  params: Any         # the current job's parameters
  acc: Any            # gradient sum of the current step (None when every
                      # step is one slot: the slot's gradient is the step's)
  opt: Any            # client transformation state
  ptr: jax.Array      # int32, index of the current job in the lane's list
  u: jax.Array        # int32, slot index within the current job
  small_sq: jax.Array  # float32, sum over this step's microbatches of
                       # |g_j|^2 (each g_j the mean over its rows)
  c_small: jax.Array   # float32, sum over them of c_eff(n_j, n)


class Shared(NamedTuple):
  """Accumulators shared by the lanes (updated outside the lane vmap)."""
  agg: Any            # [E, ...] weighted deltas
  hsum: Any           # [E, ...] sum of mean applied gradients, or None
  deltas: Any         # [J, ...] per job deltas, or None
  loss: jax.Array     # float32 [J] loss sums
  gsq: jax.Array      # float32 [J]
  trace: jax.Array    # float32 [J]
  nsteps: jax.Array   # int32 [J]
  usq: jax.Array      # float32 [J]


class SlotOut(NamedTuple):
  """What one lane reports from one slot."""
  job: jax.Array       # int32, the lane's job this slot
  loss: jax.Array      # float32, its loss sum over valid rows
  est: jax.Array       # bool, a noise estimate was made
  g_sq: jax.Array      # float32
  trace: jax.Array     # float32
  job_end: jax.Array   # bool, the job finished this slot


def sq_norm(tree):
  """``sum |leaf|^2`` over a tree."""
  return sum(jnp.vdot(a, a).real for a in jax.tree.leaves(tree))


def finite_lanes(tree):
  """``[L]``: whether every value of each lane's slice of ``tree`` is
  finite."""
  leaves = jax.tree.leaves(tree)
  ok = [jnp.isfinite(a).reshape(a.shape[0], -1).all(axis=1) for a in leaves]
  return functools.reduce(jnp.logical_and, ok)


def _kept(f, t, keep):
  """``t[l] * f[l]`` where ``keep[l]``, else 0 (also where ``t[l]`` is not
  finite: one fused pass, where ``0 * nan`` would be NaN)."""
  return tmap(lambda a: jnp.where(_lanes_like(keep, a),
                                  a * _lanes_like(f, a), 0), t)


def _select(flag, a, b):
  return tmap(lambda x, y: jnp.where(flag, x, y), a, b)


def _gradients(spec: Spec, params, xb, yb, valid):
  """Loss sum and gradient sum of a slot's ``R`` microbatches (``xb [R,
  mu, ...]``), plus (with noise statistics) each microbatch's squared
  gradient norm and row count."""
  R, mu = spec.per_slot, spec.microbatch

  def one(x, y, v):
    def masked_loss(p):
      return jnp.sum(jnp.where(v, spec.loss_fn(p, x, y), 0.0))
    return jax.value_and_grad(masked_loss)(params)

  nv = jnp.sum(valid, -1).astype(jnp.int32)
  if R == 1 or not spec.noise_stats:  # one gradient over the whole slot
    lsum, g = one(xb.reshape((R * mu,) + xb.shape[2:]), yb.reshape(-1),
                  valid.reshape(-1))
    return lsum, g, (sq_norm(g)[None] if spec.noise_stats else None), nv
  lsums, gs = jax.vmap(one)(xb, yb, valid)
  return lsums.sum(), tmap(lambda a: a.sum(0), gs), jax.vmap(sq_norm)(gs), nv


def slot_step(spec: Spec, rd: Round, ln: Lanes, lane,
              one_slot: bool = False) -> tuple[Lanes, SlotOut]:
  """One lane, one slot (``vmap``-ped over the lanes by :func:`run_lanes`).

  ``one_slot``: every job's step is one slot (``ln.acc`` is None): the
  slot's gradient is the step's, with no accumulator carried between slots
  (the same values; a CPU round of 64 clients at batch 10 runs 15-35%
  faster without the carried buffer, measured)."""
  R, mu = spec.per_slot, spec.microbatch
  J = rd.jobs.client.shape[0]
  lay, jb = rd.layout, rd.jobs
  active = ln.ptr < lay.count[lane]
  j = lay.order[jnp.clip(lay.begin[lane] + ln.ptr, 0, J - 1)]
  c = jb.client[j]
  n = rd.data.num_examples[c]
  b, m, s, lr = jb.batch[j], rd.slots_per_step[j], jb.steps[j], jb.lr[j]
  step, k = ln.u // m, ln.u % m
  within = k * (R * mu) + jnp.arange(R * mu, dtype=jnp.int32).reshape(R, mu)
  valid = active & (within < b)
  pos = (step * b + within) % jnp.maximum(n, 1)
  rows = federated.example_rows(rd.data, c, jb.seed[j], pos)
  lsum, g, sq, nv = _gradients(spec, ln.params, rd.data.x[rows],
                               rd.data.y[rows], valid)
  acc = g if one_slot else tmap(jnp.add, ln.acc, g)
  step_end = active & (k == m - 1)
  done = step_end & (step == s - 1)
  mean_g = tmap(lambda a: a / b.astype(jnp.float32), acc)
  direction, opt = spec.client_tx.update(mean_g, ln.opt, ln.params)
  stepped = tmap(lambda w, d: w - lr * d, ln.params, direction)
  small_sq, c_small = ln.small_sq, ln.c_small
  est = jnp.zeros((), bool)
  g_sq = tr = jnp.zeros((), jnp.float32)
  if spec.noise_stats:
    has = nv > 0
    nvf = jnp.maximum(nv, 1).astype(jnp.float32)
    small_sq = small_sq + jnp.sum(jnp.where(has, sq / nvf ** 2, 0.0))
    c_small = c_small + jnp.sum(jnp.where(
        has, noise.fpc_coefficient(jnp.maximum(nv, 1), n), 0.0))
    mb = (b + mu - 1) // mu                 # microbatches in the step
    mf = mb.astype(jnp.float32)
    g_sq, tr, ok = noise.fpc_estimates(
        small_sq / mf, c_small / mf, sq_norm(mean_g),
        noise.fpc_coefficient(b, n))
    est = step_end & (mb >= 2) & ok
    small_sq = jnp.where(step_end, 0.0, small_sq)
    c_small = jnp.where(step_end, 0.0, c_small)
  new = Lanes(
      params=_select(step_end, stepped, ln.params),
      acc=None if one_slot else _select(step_end,
                                        tmap(jnp.zeros_like, acc), acc),
      opt=_select(step_end, opt, ln.opt),
      ptr=ln.ptr + done.astype(jnp.int32),
      u=jnp.where(done, 0, ln.u + active.astype(jnp.int32)),
      small_sq=small_sq, c_small=c_small)
  out = SlotOut(j, jnp.where(active, lsum, 0.0), est,
                jnp.where(est, g_sq, 0.0), jnp.where(est, tr, 0.0), done)
  return new, out


def _job_start(spec: Spec, rd: Round, job):
  """Server parameters and fresh client state for jobs ``job [L]``."""
  start = tmap(lambda a: a[rd.jobs.exp[job]], rd.server)
  inp = None if rd.inputs is None else tmap(lambda a: a[job], rd.inputs)
  return start, jax.vmap(spec.client_init)(start, inp)


def _next_job(rd: Round, ptr, lane_ids):
  J = rd.jobs.client.shape[0]
  return rd.layout.order[jnp.clip(rd.layout.begin[lane_ids] + ptr, 0, J - 1)]


def _by_experiment(spec: Spec, t, e, live):
  """Sums the ``live`` lanes of a ``[L, ...]`` tree into ``[E, ...]`` by
  each lane's experiment ``e [L]`` (a one-hot contraction: dense, unlike a
  scatter on a CPU). :func:`job_end` already leaves a failed job's lane out;
  as a second line, experiments stay isolated: a lane's non-finite values
  make its own experiment's sum NaN and no other's (``0 * inf`` in the
  contraction would spread them to every experiment of the sweep). With one
  experiment the sum is plain: the lanes that did not finish carry weight
  0, and their non-finite values could only be that experiment's own."""
  if spec.experiments == 1:   # lanes that did not finish carry weight 0
    return tmap(lambda a: a.sum(0, keepdims=True), t)
  onehot = (e[None, :] == jnp.arange(spec.experiments)[:, None])

  def one(a):
    a = jnp.where(_lanes_like(live, a), a, 0)
    ok = jnp.isfinite(a)
    bad = ~ok.reshape(a.shape[0], -1).all(axis=1)            # [L]
    hit = jnp.any(onehot & bad[None, :], axis=1)             # [E]
    s = jnp.tensordot(onehot.astype(a.dtype), jnp.where(ok, a, 0), 1)
    return jnp.where(_lanes_like(hit, s), jnp.nan, s)

  return tmap(one, t)


def _lanes_like(flag, a):
  """``flag [n]`` shaped to broadcast against ``a [n, ...]``."""
  return flag.reshape((-1,) + (1,) * (a.ndim - 1))


def job_end(spec: Spec, rd: Round, ln: Lanes, sh: Shared, out: SlotOut,
            lane_ids) -> tuple[Lanes, Shared]:
  """Adds the finished jobs into the accumulators and resets their lanes
  to the next job (O(params) work, run only in slots where some lane
  finished a job)."""
  j, end = out.job, out.job_end
  e = rd.jobs.exp[j]
  raw = tmap(jnp.subtract, ln.params, tmap(lambda a: a[e], rd.server))
  # a job whose model went non-finite is left out of every sum (the server
  # rejects a failed client); its update_sq is NaN so the controller sees it
  fin = finite_lanes(raw)
  keep = end & fin
  w = jnp.where(keep, rd.jobs.weight[j], 0.0)
  agg = tmap(jnp.add, sh.agg,
             _by_experiment(spec, _kept(w, raw, keep), e, keep))
  hsum, usq, deltas = sh.hsum, sh.usq, sh.deltas
  if spec.noise_stats:
    s = jnp.maximum(rd.jobs.steps[j], 1).astype(jnp.float32)
    h = _kept(jnp.where(keep, -1.0 / (rd.jobs.lr[j] * s), 0.0), raw, keep)
    usq_add = jnp.where(end, jax.vmap(sq_norm)(h), 0.0)
    hsum = tmap(jnp.add, hsum, _by_experiment(spec, h, e, keep))
  else:
    usq_add = jnp.zeros(end.shape, jnp.float32)
  usq = usq.at[j].add(jnp.where(end & ~fin, jnp.nan, usq_add))
  if spec.client_deltas:
    at = jnp.where(end, j, rd.jobs.client.shape[0])
    deltas = tmap(lambda buf, d: buf.at[at].set(d, mode="drop"), deltas,
                  tmap(lambda a: jnp.where(_lanes_like(fin, a), a, 0), raw))
  start, opt = _job_start(spec, rd, _next_job(rd, ln.ptr, lane_ids))
  reset = lambda x, y: jnp.where(_lanes_like(end, x), x, y)
  ln = ln._replace(params=tmap(reset, start, ln.params),
                   opt=tmap(reset, opt, ln.opt))
  return ln, sh._replace(agg=agg, hsum=hsum, usq=usq, deltas=deltas)


def _initial(spec: Spec, rd: Round, lane_ids,
             one_slot: bool) -> tuple[Lanes, Shared]:
  L, J, E = lane_ids.shape[0], rd.jobs.client.shape[0], spec.experiments
  one = tmap(lambda a: a[0], rd.server)
  zeros = lambda n: tmap(lambda a: jnp.zeros((n,) + a.shape, a.dtype), one)
  fz, iz = jnp.zeros((L,), jnp.float32), jnp.zeros((L,), jnp.int32)
  start, opt = _job_start(spec, rd, _next_job(rd, iz, lane_ids))
  jf = jnp.zeros((J,), jnp.float32)
  shared = Shared(agg=zeros(E), hsum=zeros(E) if spec.noise_stats else None,
                  deltas=zeros(J) if spec.client_deltas else None, loss=jf,
                  gsq=jf, trace=jf, nsteps=jnp.zeros((J,), jnp.int32),
                  usq=jf)
  return Lanes(start, None if one_slot else zeros(L), opt, iz, iz, fz,
               fz), shared


def run_lanes(spec: Spec, rd: Round, first_lane, num_lanes: int) -> Shared:
  """Runs lanes ``first_lane ... + num_lanes - 1`` in lock step until the
  fullest is done (a ``fori_loop`` whose trip count is known only on
  device); returns what they accumulated."""
  lane_ids = first_lane + jnp.arange(num_lanes, dtype=jnp.int32)
  total = jnp.max(rd.layout.load[lane_ids])

  def loop(one_slot):
    step_all = jax.vmap(lambda r, l, i: slot_step(spec, r, l, i, one_slot),
                        in_axes=(None, 0, 0))

    def body(_, carry):
      ln, sh = carry
      ln, out = step_all(rd, ln, lane_ids)
      sh = sh._replace(
          loss=sh.loss.at[out.job].add(out.loss),
          gsq=sh.gsq.at[out.job].add(out.g_sq),
          trace=sh.trace.at[out.job].add(out.trace),
          nsteps=sh.nsteps.at[out.job].add(out.est.astype(jnp.int32)))
      # only what job_end changes passes through the cond (a cond's
      # outputs are fresh buffers: the step accumulator would be copied)
      def ended(part):
        l2, s2 = job_end(spec, rd, ln._replace(params=part[0], opt=part[1]),
                         sh._replace(agg=part[2], hsum=part[3], usq=part[4],
                                     deltas=part[5]), out, lane_ids)
        return (l2.params, l2.opt, s2.agg, s2.hsum, s2.usq, s2.deltas)
      part = jax.lax.cond(
          jnp.any(out.job_end), ended, lambda a: a,
          (ln.params, ln.opt, sh.agg, sh.hsum, sh.usq, sh.deltas))
      return (ln._replace(params=part[0], opt=part[1]),
              sh._replace(agg=part[2], hsum=part[3], usq=part[4],
                          deltas=part[5]))

    return lambda: jax.lax.fori_loop(
        0, total, body, _initial(spec, rd, lane_ids, one_slot))[1]

  # a round whose every step is one slot (the common case: slots hold a
  # step at the reference batch) runs without the step accumulator
  one = jnp.all((rd.slots_per_step <= 1) | (rd.jobs.steps <= 0))
  return jax.lax.cond(one, loop(True), loop(False))
