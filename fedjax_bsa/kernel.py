"""The round kernel: every client job of a round in one compiled update.

See ``docs/design.md`` ("The round kernel"). A *job* is one client's local
training in one experiment: ``s_j`` steps of batch ``b_j`` at learning rate
``lr_j``, starting from its experiment's server parameters. A step is
``m_j = ceil(b_j / mu)`` *slots* of ``mu`` examples (the last one masked
when ``mu`` does not divide ``b_j``) whose gradients are summed and applied
at the step's last slot through the algorithm's client transformation
(an optax ``GradientTransformation``): ``w <- w - lr_j * tx(mean grad)``.
Jobs of all experiments share one pool of ``L`` vmapped lanes
(:mod:`fedjax_bsa.layout`); at a job's end the lane adds ``c_j (x_j -
x_e)`` into its experiment's aggregate, then resets to the next job's
server parameters and client state. The lanes advance in lock step for as
many slots as the fullest lane needs, a count known only on device, so the
loop is a ``fori_loop`` with a traced trip count: one compile serves every
plan, and the work done is the packed work of all experiments together.

The kernel is blind to algorithms: it runs any client transformation whose
state ``client_init(server_params, client_input)`` rebuilds per job.

Semantics equal :func:`fedjax_bsa.reference.reference_round`, a per-client
loop with exact shapes: step ``t`` of job ``j`` on client ``c`` uses the
rows at stream positions ``t * b_j + i`` (``i < b_j``, taken mod ``n_c``) of
the client's shuffle this round (:func:`fedjax_bsa.data.federated.
example_rows`).

On several devices (``mesh=``) the lanes are split over a mesh axis with
``jax.shard_map``: the jobs' rows are gathered from the (row-sharded) data
into one buffer, each device runs its ``L / D`` lanes, and the accumulators
are ``psum``-ed inside the program.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_bsa import layout as layout_lib
from fedjax_bsa import noise
from fedjax_bsa.data import federated

__all__ = ["Plan", "Jobs", "ClientStats", "RoundOutput", "make_round_kernel",
           "cohort_rows"]

tmap = jax.tree.map


class Plan(NamedTuple):
  """What each cohort client does this round."""
  batch_size: jax.Array  # int32 [K], >= 1
  steps: jax.Array       # int32 [K], >= 0 (0: the client does nothing)
  lr: jax.Array          # float32 [K]


class Jobs(NamedTuple):
  """The round's client jobs, of every experiment, flattened to ``[J]``."""
  client: jax.Array  # int32 [J], client index into the data
  exp: jax.Array     # int32 [J], experiment (index into server params)
  batch: jax.Array   # int32 [J], >= 1
  steps: jax.Array   # int32 [J], >= 0
  lr: jax.Array      # float32 [J]
  weight: jax.Array  # float32 [J], aggregation coefficient c_j
  seed: jax.Array    # uint32 [J, ...], the client's shuffle seed this round


class ClientStats(NamedTuple):
  """Per job statistics of one round (zeros for idle jobs)."""
  loss: jax.Array         # float32 [J], mean training loss over its examples
  examples: jax.Array     # int32 [J], examples processed (b_j * s_j)
  steps: jax.Array        # int32 [J], local steps taken
  grad_sq: jax.Array      # float32 [J], mean over noise steps of |G|^2 est.
  trace: jax.Array        # float32 [J], mean over noise steps of tr(Sigma)
  noise_steps: jax.Array  # int32 [J], steps that gave an estimate
  update_sq: jax.Array    # float32 [J], |mean applied gradient|^2


class RoundOutput(NamedTuple):
  delta: Any              # [E, ...] sum_j c_j (x_j - x_e), a params tree
  stats: ClientStats      # [J]
  update_sum_sq: jax.Array  # float32 [E], |sum_j h_j|^2 of mean applied grads
  slots: jax.Array        # int32 [], microbatches computed (lanes x loop
                          # iterations x per_slot)
  useful: jax.Array       # int32 [], examples that carried data
  client_deltas: Any      # [J, ...] x_j - x_e, or None


def _sq_norm(tree):
  return sum(jnp.vdot(a, a).real for a in jax.tree.leaves(tree))


def _select(flag, a, b):
  return tmap(lambda x, y: jnp.where(flag, x, y), a, b)


def _lane_select(flag, a, b):
  """``where(flag[l], a[l], b[l])`` over the leading lane axis."""
  return tmap(lambda x, y: jnp.where(
      flag.reshape((-1,) + (1,) * (x.ndim - 1)), x, y), a, b)


class _Lanes(NamedTuple):
  """Per-lane loop state (leading axis ``[L]`` on every leaf)."""
  params: Any         # the current job's parameters
  acc: Any            # gradient sum of the current step
  opt: Any            # client transformation state
  ptr: jax.Array      # int32, index of the current job in the lane's list
  u: jax.Array        # int32, slot index within the current job
  small_sq: jax.Array  # float32, sum over this step's slots of |g_slot|^2
  c_small: jax.Array   # float32, sum over them of c_eff(n_slot, n)


class _Shared(NamedTuple):
  """Accumulators shared by the lanes (updated outside the lane vmap)."""
  agg: Any            # [E, ...] weighted deltas
  hsum: Any           # [E, ...] sum of mean applied gradients, or None
  deltas: Any         # [J, ...] per job deltas, or None
  loss: jax.Array     # float32 [J] loss sums
  gsq: jax.Array      # float32 [J]
  trace: jax.Array    # float32 [J]
  nsteps: jax.Array   # int32 [J]
  usq: jax.Array      # float32 [J]


class _SlotOut(NamedTuple):
  job: jax.Array       # int32, the lane's job this slot
  loss: jax.Array      # float32, its loss sum over valid rows
  est: jax.Array       # bool, a noise estimate was made
  g_sq: jax.Array      # float32
  trace: jax.Array     # float32
  job_end: jax.Array   # bool, the job finished this slot


class _Round(NamedTuple):
  """What every lane reads (replicated over a mesh)."""
  server: Any          # [E, ...] server parameters
  data: federated.FederatedData
  jobs: Jobs
  inputs: Any          # [J, ...] client inputs, or None
  slots_per_step: jax.Array  # int32 [J]
  layout: layout_lib.Layout


def make_round_kernel(loss_fn: Callable, client_tx, client_init: Callable, *,
                      microbatch: int, lanes: int, per_slot: int = 1,
                      num_experiments: int = 1,
                      noise_stats: bool = True, client_deltas: bool = False,
                      mesh: jax.sharding.Mesh | None = None,
                      axis_name: str = "clients"):
  """Builds the round kernel for a model, an algorithm's client side and a
  static layout.

  Args:
    loss_fn: ``(params, x[B, ...], y[B]) -> [B]`` per-example losses.
    client_tx: the algorithm's client ``optax.GradientTransformation``.
    client_init: ``(server_params, client_input) -> client_tx state``.
    microbatch: examples per microbatch ``mu`` (the estimator's small batch
      and the unit a step is padded to).
    lanes: vmapped lanes ``L`` (rounded up to a multiple of the mesh axis).
    per_slot: microbatches ``R`` one lane computes per loop iteration (a
      layout choice, no effect on results: wider slots amortise the loop's
      fixed cost on accelerators; see :func:`fedjax_bsa.layout.choose`).
    num_experiments: ``E``, the leading axis of the server parameters.
    noise_stats: also estimate ``|G|^2`` and ``tr(Sigma)`` per job, with the
      finite-population correction of :func:`fedjax_bsa.noise.
      fpc_coefficient`, and the mean applied gradients' spread.
    client_deltas: also return every job's ``x_j - x_e``.
    mesh: if given, split the lanes over its ``axis_name`` axis.
    axis_name: the mesh axis of the lanes.

  Returns:
    ``kernel(server_params, data, jobs, client_inputs) -> RoundOutput``
    with ``server_params`` a params tree ``[E, ...]``, ``data`` a
    :class:`~fedjax_bsa.data.federated.FederatedData`, ``jobs`` a
    :class:`Jobs` of ``[J]`` arrays and ``client_inputs`` a tree ``[J, ...]``
    (or None). The caller owns ``jit``; shapes depend only on the model,
    ``J``, ``E``, ``mu``, ``L`` and ``D``, never on the plan.
  """
  mu = int(microbatch)
  R = max(1, int(per_slot))
  E = int(num_experiments)
  D = 1 if mesh is None else int(mesh.shape[axis_name])
  L = -(-max(1, int(lanes)) // D) * D
  arange_slot = jnp.arange(R * mu, dtype=jnp.int32).reshape(R, mu)

  def gradients(params, xb, yb, valid):
    """Loss sum and gradient sum of a slot's ``R`` microbatches, plus (with
    noise statistics) each microbatch's gradient norm and row count."""
    def one(x, y, v):
      def masked_loss(p):
        return jnp.sum(jnp.where(v, loss_fn(p, x, y), 0.0))
      return jax.value_and_grad(masked_loss)(params)

    nv = jnp.sum(valid, -1).astype(jnp.int32)
    if R == 1 or not noise_stats:  # one gradient over the whole slot
      lsum, g = one(xb.reshape((R * mu,) + xb.shape[2:]), yb.reshape(-1),
                    valid.reshape(-1))
      return lsum, g, (_sq_norm(g)[None] if noise_stats else None), nv
    lsums, gs = jax.vmap(one)(xb, yb, valid)
    g = tmap(lambda a: a.sum(0), gs)
    return lsums.sum(), g, jax.vmap(_sq_norm)(gs), nv

  def slot(rd: _Round, ln: _Lanes, lane) -> tuple[_Lanes, _SlotOut]:
    J = rd.jobs.client.shape[0]
    lay, jb = rd.layout, rd.jobs
    active = ln.ptr < lay.count[lane]
    j = lay.order[jnp.clip(lay.begin[lane] + ln.ptr, 0, J - 1)]
    c = jb.client[j]
    n = rd.data.num_examples[c]
    b, m, s, lr = jb.batch[j], rd.slots_per_step[j], jb.steps[j], jb.lr[j]
    step, k = ln.u // m, ln.u % m
    within = k * (R * mu) + arange_slot                       # [R, mu]
    valid = active & (within < b)
    pos = (step * b + within) % jnp.maximum(n, 1)
    rows = federated.example_rows(rd.data, c, jb.seed[j], pos)
    xb, yb = rd.data.x[rows], rd.data.y[rows]
    lsum, g, sq, nv = gradients(ln.params, xb, yb, valid)
    acc = tmap(jnp.add, ln.acc, g)
    step_end = active & (k == m - 1)
    job_end = step_end & (step == s - 1)
    mean_g = tmap(lambda a: a / b.astype(jnp.float32), acc)
    direction, opt = client_tx.update(mean_g, ln.opt, ln.params)
    stepped = tmap(lambda w, d: w - lr * d, ln.params, direction)
    small_sq, c_small = ln.small_sq, ln.c_small
    est = jnp.zeros((), bool)
    g_sq = tr = jnp.zeros((), jnp.float32)
    if noise_stats:
      has = nv > 0
      nvf = jnp.maximum(nv, 1).astype(jnp.float32)
      small_sq = small_sq + jnp.sum(jnp.where(has, sq / nvf ** 2, 0.0))
      c_small = c_small + jnp.sum(jnp.where(
          has, noise.fpc_coefficient(jnp.maximum(nv, 1), n), 0.0))
      mb = (b + mu - 1) // mu                 # microbatches in the step
      mf = mb.astype(jnp.float32)
      g_sq, tr, ok = noise.fpc_estimates(
          small_sq / mf, c_small / mf, _sq_norm(mean_g),
          noise.fpc_coefficient(b, n))
      est = step_end & (mb >= 2) & ok
      small_sq = jnp.where(step_end, 0.0, small_sq)
      c_small = jnp.where(step_end, 0.0, c_small)
    new = _Lanes(
        params=_select(step_end, stepped, ln.params),
        acc=_select(step_end, tmap(jnp.zeros_like, acc), acc),
        opt=_select(step_end, opt, ln.opt),
        ptr=ln.ptr + job_end.astype(jnp.int32),
        u=jnp.where(job_end, 0, ln.u + active.astype(jnp.int32)),
        small_sq=small_sq, c_small=c_small)
    out = _SlotOut(j, jnp.where(active, lsum, 0.0), est,
                   jnp.where(est, g_sq, 0.0), jnp.where(est, tr, 0.0),
                   job_end)
    return new, out

  def start_of(rd: _Round, job):
    """Server parameters and fresh client state for ``job`` ([L])."""
    start = tmap(lambda a: a[rd.jobs.exp[job]], rd.server)
    inp = None if rd.inputs is None else tmap(lambda a: a[job], rd.inputs)
    return start, jax.vmap(client_init)(start, inp)

  def next_job(rd: _Round, ln: _Lanes, lane_ids):
    J = rd.jobs.client.shape[0]
    return rd.layout.order[jnp.clip(rd.layout.begin[lane_ids] + ln.ptr, 0,
                                    J - 1)]

  def job_end(rd: _Round, ln: _Lanes, sh: _Shared, out: _SlotOut,
              lane_ids):
    """Adds the finished jobs into the accumulators and resets their
    lanes to the next job (O(params) work, run only in slots where some
    lane finished a job)."""
    j, end = out.job, out.job_end
    e = rd.jobs.exp[j]
    base = tmap(lambda a: a[e], rd.server)
    delta = tmap(jnp.subtract, ln.params, base)
    w = jnp.where(end, rd.jobs.weight[j], 0.0)
    seg = lambda t: tmap(lambda a: jax.ops.segment_sum(a, e, E), t)
    scaled = lambda t, f: tmap(
        lambda a: a * f.reshape((-1,) + (1,) * (a.ndim - 1)), t)
    agg = tmap(jnp.add, sh.agg, seg(scaled(delta, w)))
    hsum, usq, deltas = sh.hsum, sh.usq, sh.deltas
    if noise_stats:
      s = jnp.maximum(rd.jobs.steps[j], 1).astype(jnp.float32)
      f = jnp.where(end, -1.0 / (rd.jobs.lr[j] * s), 0.0)
      h = scaled(delta, f)
      usq = usq.at[j].add(jax.vmap(_sq_norm)(h))
      hsum = tmap(jnp.add, hsum, seg(h))
    if client_deltas:
      J = rd.jobs.client.shape[0]
      at = jnp.where(end, j, J)
      deltas = tmap(lambda buf, d: buf.at[at].set(d, mode="drop"), deltas,
                    delta)
    start, opt = start_of(rd, next_job(rd, ln, lane_ids))
    ln = ln._replace(params=_lane_select(end, start, ln.params),
                     opt=_lane_select(end, opt, ln.opt))
    return ln, sh._replace(agg=agg, hsum=hsum, usq=usq, deltas=deltas)

  def run_lanes(rd: _Round, first_lane, num_lanes: int) -> _Shared:
    """Runs lanes ``first_lane ... + num_lanes - 1`` to their end."""
    J = rd.jobs.client.shape[0]
    lane_ids = first_lane + jnp.arange(num_lanes, dtype=jnp.int32)
    one = tmap(lambda a: a[0], rd.server)
    zeros_l = tmap(lambda a: jnp.zeros((num_lanes,) + a.shape, a.dtype), one)
    zeros_e = tmap(lambda a: jnp.zeros((E,) + a.shape, a.dtype), one)
    fz = jnp.zeros((num_lanes,), jnp.float32)
    iz = jnp.zeros((num_lanes,), jnp.int32)
    start, opt = start_of(rd, next_job(rd, _Lanes(None, None, None, iz, iz,
                                                   fz, fz), lane_ids))
    lanes0 = _Lanes(start, zeros_l, opt, iz, iz, fz, fz)
    jf = jnp.zeros((J,), jnp.float32)
    shared0 = _Shared(
        agg=zeros_e, hsum=zeros_e if noise_stats else None,
        deltas=(tmap(lambda a: jnp.zeros((J,) + a.shape, a.dtype), one)
                if client_deltas else None),
        loss=jf, gsq=jf, trace=jf, nsteps=jnp.zeros((J,), jnp.int32),
        usq=jf)
    step_all = jax.vmap(slot, in_axes=(None, 0, 0))
    total = jnp.max(rd.layout.load[lane_ids])

    def body(_, carry):
      ln, sh = carry
      ln, out = step_all(rd, ln, lane_ids)
      sh = sh._replace(
          loss=sh.loss.at[out.job].add(out.loss),
          gsq=sh.gsq.at[out.job].add(out.g_sq),
          trace=sh.trace.at[out.job].add(out.trace),
          nsteps=sh.nsteps.at[out.job].add(out.est.astype(jnp.int32)))
      return jax.lax.cond(
          jnp.any(out.job_end),
          lambda a: job_end(rd, *a, out, lane_ids),
          lambda a: a, (ln, sh))

    _, shared = jax.lax.fori_loop(0, total, body, (lanes0, shared0))
    return shared

  def sharded_lanes(rd: _Round) -> _Shared:
    def local(rd):
      dev = jax.lax.axis_index(axis_name).astype(jnp.int32)
      return jax.lax.psum(run_lanes(rd, dev * (L // D), L // D), axis_name)
    spec = jax.sharding.PartitionSpec()
    return jax.shard_map(local, mesh=mesh, in_specs=(spec,), out_specs=spec,
                         check_vma=False)(rd)

  def kernel(server_params, data: federated.FederatedData, jobs: Jobs,
             client_inputs=None) -> RoundOutput:
    b = jnp.maximum(jobs.batch.astype(jnp.int32), 1)
    s = jnp.maximum(jobs.steps.astype(jnp.int32), 0)
    jobs = jobs._replace(batch=b, steps=s, lr=jobs.lr.astype(jnp.float32),
                         weight=jobs.weight.astype(jnp.float32))
    m = layout_lib.slots_per_step(b, mu, R)
    lay = layout_lib.make_layout(s * m, L)
    rd = _Round(server_params, data, jobs, client_inputs, m, lay)
    sh = run_lanes(rd, jnp.int32(0), L) if mesh is None else sharded_lanes(
        rd)
    examples = b * s
    denom = jnp.maximum(sh.nsteps, 1).astype(jnp.float32)
    stats = ClientStats(
        loss=sh.loss / jnp.maximum(examples, 1).astype(jnp.float32),
        examples=examples, steps=s, grad_sq=sh.gsq / denom,
        trace=sh.trace / denom, noise_steps=sh.nsteps, update_sq=sh.usq)
    usum = (jax.vmap(_sq_norm)(sh.hsum) if noise_stats
            else jnp.zeros((E,), jnp.float32))
    return RoundOutput(sh.agg, stats, usum, jnp.max(lay.load) * L * R,
                       examples.sum(), sh.deltas)

  return kernel


def cohort_rows(data: federated.FederatedData, clients, max_rows: int):
  """The rows of ``clients`` gathered into one compact buffer.

  Used on a mesh, where the data is sharded over rows: the jobs' rows are
  gathered once per round (XLA moves them between devices) and every
  device then reads the compact copy.

  Args:
    data: the (sharded) federation.
    clients: int32 ``[J]`` the jobs' clients.
    max_rows: static bound on the jobs' rows in total (the sum of the ``J``
      largest clients).

  Returns:
    A :class:`~fedjax_bsa.data.federated.FederatedData` of ``J`` clients
    (client ``j`` is job ``j``'s client) whose ``rows`` are the identity.
  """
  n = data.num_examples[clients]
  start = jnp.cumsum(n) - n
  pos = jnp.arange(max_rows, dtype=jnp.int32)
  job = jnp.clip(jnp.searchsorted(start, pos, side="right") - 1, 0,
                 clients.shape[0] - 1)
  inside = (pos - start[job]) < n[job]
  src = data.rows[data.offset[clients[job]] + jnp.where(inside,
                                                         pos - start[job], 0)]
  return federated.FederatedData(
      data.x[src], data.y[src], pos, start.astype(jnp.int32),
      n.astype(jnp.int32))
