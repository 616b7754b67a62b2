"""The round kernel: every cohort client's local SGD in one compiled update.

Layout (DESIGN.md section 3). Client ``k`` runs ``s_k`` steps of batch
``b_k``; a step is ``m_k = ceil(b_k / mu)`` *microbatch slots* of ``mu``
examples (the last one masked when ``mu`` does not divide ``b_k``), whose
gradients are accumulated and applied at the step's last slot. The clients'
slot sequences are packed one after another into ``L`` vmapped *lanes*,
longest job first onto the least-loaded lane; at the end of a client the lane
adds the client's weighted delta to its running aggregate and resets to the
server parameters. The lanes advance in lock step for as many slots as the
fullest lane needs, a count known only on device, so the loop is a
``fori_loop`` with a traced trip count: one compile serves every plan (no slot
budget, no buckets), and the work done is the packed work, not
``clients x s_max x b_max``.

On several devices (``mesh=``), the lanes are split over a mesh axis with
``jax.shard_map``: the cohort's rows are gathered from the client-sharded
data, each device runs its ``L / D`` lanes with its own loop, and the
aggregate and per-client statistics are ``psum``-ed inside the program.

Semantics equal :func:`fedjax_bsa.reference.reference_round`, a per-client
loop with exact shapes: step ``t`` of client ``k`` uses rows
``perm_k[(t * b_k + i) mod n_k]``, ``i < b_k``, of its shuffled data; its
update is ``v <- rho v + (mean grad + prox_mu (w - w_server) + correction_k)``,
``w <- w - lr_k v``.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_bsa import federated
from fedjax_bsa import models
from fedjax_bsa import noise

__all__ = ["Plan", "ClientStats", "RoundOutput", "make_round_kernel",
           "pack_lanes", "default_lanes"]

tmap = jax.tree.map


class Plan(NamedTuple):
  """What each cohort client does this round."""
  batch_size: jax.Array  # int32 [K], >= 1
  steps: jax.Array       # int32 [K], >= 0 (0: the client does nothing)
  lr: jax.Array          # float32 [K]


class ClientStats(NamedTuple):
  """Per cohort client statistics of one round (zeros for idle clients)."""
  loss: jax.Array         # float32 [K], mean training loss over its examples
  examples: jax.Array     # int32 [K], examples processed (b_k * s_k)
  steps: jax.Array        # int32 [K], local steps taken
  grad_sq: jax.Array      # float32 [K], mean over noise steps of |G|^2 est.
  trace: jax.Array        # float32 [K], mean over noise steps of tr(Sigma)
  noise_steps: jax.Array  # int32 [K], steps with >= 2 microbatches
  update_sq: jax.Array    # float32 [K], |mean applied gradient|^2


class RoundOutput(NamedTuple):
  delta: dict               # sum_k w_k (x_k - x_server), a params tree
  stats: ClientStats
  heterogeneity: jax.Array  # float32 [], spread of client mean gradients
  slots: jax.Array          # int32 [], lanes x slots run (microbatches)
  useful: jax.Array         # int32 [], examples that carried data
  client_delta: dict | None  # [K, ...] x_k - x_server (per_client_outputs)


def default_lanes(cohort_size: int) -> int:
  """Lanes used when the config says 0: about four clients per lane, at
  most 16 on a CPU (measured: 8-16 lanes are fastest there; wider lanes pay
  off on accelerators)."""
  lanes = max(1, -(-cohort_size // 4))
  if jax.default_backend() == "cpu":
    lanes = min(lanes, 16)
  return lanes


def pack_lanes(slots: jax.Array, lanes: int):
  """Longest-processing-time-first packing of client jobs onto lanes.

  Args:
    slots: int32 ``[K]`` slots each client needs (0: not packed).
    lanes: number of lanes ``L``.

  Returns:
    ``(lane, start, load)``: int32 ``[K]`` lane of each client (``L`` for
    clients with no slots), its first slot on that lane, and int32 ``[L]``
    slots per lane.
  """
  order = jnp.argsort(-slots, stable=True)

  def place(load, k):
    lane = jnp.argmin(load).astype(jnp.int32)
    start = load[lane]
    return load.at[lane].add(slots[k]), (lane, start)

  load, (lane_o, start_o) = jax.lax.scan(
      place, jnp.zeros((lanes,), jnp.int32), order)
  lane = jnp.zeros_like(slots).at[order].set(lane_o)
  start = jnp.zeros_like(slots).at[order].set(start_o)
  return jnp.where(slots > 0, lane, lanes), start, load


class _Lane(NamedTuple):
  params: dict       # this lane's current client parameters
  acc: dict          # gradient sum of the current step
  mom: dict          # client momentum buffer
  agg: dict          # sum of weighted deltas of clients finished here
  hsum: dict         # sum of clients' mean applied gradients (noise_stats)
  last: dict         # delta of the last client finished (per_client_outputs)
  ptr: jax.Array     # int32, index of the current client in the lane's list
  u: jax.Array       # int32, slot index within the current client
  small_sq: jax.Array  # float32, sum over microbatches of |g_j|^2
  inv_n: jax.Array     # float32, sum over microbatches of 1 / n_j
  loss: jax.Array      # float32 [K], loss sums per cohort client
  gsq: jax.Array       # float32 [K]
  trace: jax.Array     # float32 [K]
  nsteps: jax.Array    # int32 [K]
  usq: jax.Array       # float32 [K]


def _sq_norm(tree):
  return sum(jnp.vdot(a, a).real for a in jax.tree.leaves(tree))


class _Prep(NamedTuple):
  """Per-round arrays every lane reads (replicated over a mesh)."""
  params: dict          # server parameters
  x: jax.Array          # rows: data.x [N, ...] (one device) or [K, ...]
  y: jax.Array          # labels, as ``x``
  row_of: jax.Array     # int32 [K], index into x/y's leading axis
  n: jax.Array          # int32 [K] examples held
  b: jax.Array          # int32 [K] batch
  m: jax.Array          # int32 [K] slots per step
  s: jax.Array          # int32 [K] steps
  lr: jax.Array         # float32 [K]
  perm: jax.Array       # int32 [K, n_max]
  order: jax.Array      # int32 [K] clients sorted by (lane, start)
  count: jax.Array      # int32 [L] clients per lane
  begin: jax.Array      # int32 [L] first entry of each lane in ``order``
  load: jax.Array       # int32 [L] slots per lane
  lane_of: jax.Array    # int32 [K] lane of each client (L: none)
  weights: jax.Array    # float32 [K]
  correction: dict | None  # [K, ...] or None


def make_round_kernel(apply_fn: Callable, *, microbatch: int, lanes: int,
                      noise_stats: bool = True, prox_mu: float = 0.0,
                      momentum: float = 0.0,
                      per_client_outputs: bool = False,
                      example_loss: Callable | None = None,
                      mesh: jax.sharding.Mesh | None = None,
                      axis_name: str = "clients",
                      loop_axis_name: str | None = None):
  """Builds the round kernel for a model and static layout settings.

  Args:
    apply_fn: ``apply(params, x[B, ...]) -> logits[B, C]``.
    microbatch: examples per slot ``mu``.
    lanes: vmapped lanes ``L`` (capped at the cohort size).
    noise_stats: also estimate ``|G|^2`` and ``tr(Sigma)`` per client and
      the between-client heterogeneity (a little extra work per slot).
    prox_mu: FedProx proximal weight (0: plain local SGD).
    momentum: client SGD momentum ``rho``.
    per_client_outputs: also return each client's delta (SCAFFOLD); uses one
      lane per client.
    example_loss: ``(params, x[B, ...], y[B]) -> [B]`` per-example losses
      (default: softmax cross-entropy of ``apply_fn``'s logits).
    mesh: if given, the lanes are split over its ``axis_name`` axis with
      ``jax.shard_map``: ``L`` is rounded up to a multiple of the axis size
      ``D``, the cohort's rows ``[K, n_max, ...]`` are gathered from ``data``
      (which may be sharded over clients) and each device runs its ``L / D``
      lanes; the aggregate and the per-client statistics are ``psum``-ed.
      Results equal the one-device kernel's up to float summation order.
    axis_name: the mesh axis the lanes are split over.
    loop_axis_name: when the kernel runs under ``jax.vmap(...,
      axis_name=loop_axis_name)`` (a sweep), the slot loop runs for the
      largest trip count over that axis (``lax.pmax``): lanes past their end
      are no-ops, and an unbatched trip count avoids a batched-predicate
      loop that would select over the whole carry at every slot.

  Returns:
    ``kernel(params, data, cohort, plan, weights, key, correction=None)``
    returning a :class:`RoundOutput`. ``cohort`` is int32 ``[K]`` client ids,
    ``weights`` float32 ``[K]`` aggregation weights, ``correction`` an
    optional params tree with a leading ``[K]`` axis added to each client's
    gradient (SCAFFOLD's ``c - c_k``). The caller owns ``jit``; shapes
    depend only on the model, ``K``, ``mu``, ``L`` and ``D``, never on the
    plan.
  """
  mu = int(microbatch)
  loss_fn = (functools.partial(models.example_losses, apply_fn)
             if example_loss is None else example_loss)
  D = 1 if mesh is None else int(mesh.shape[axis_name])

  def slot(pr: _Prep, st: _Lane, lane) -> _Lane:
    params = pr.params
    K = pr.n.shape[0]
    zeros = tmap(jnp.zeros_like, params)
    active = st.ptr < pr.count[lane]
    c = pr.order[jnp.clip(pr.begin[lane] + st.ptr, 0, K - 1)]
    bk, mk, sk, lrk = pr.b[c], pr.m[c], pr.s[c], pr.lr[c]
    step, j = st.u // mk, st.u % mk
    within = j * mu + jnp.arange(mu, dtype=jnp.int32)
    valid = active & (within < bk)
    rows = federated.example_index(pr.perm[c], pr.n[c], step * bk + within)
    xb = pr.x[pr.row_of[c], rows]
    yb = pr.y[pr.row_of[c], rows]

    def masked_loss(p):
      return jnp.sum(jnp.where(valid, loss_fn(p, xb, yb), 0.0))

    lsum, g = jax.value_and_grad(masked_loss)(st.params)
    acc = tmap(jnp.add, st.acc, g)
    nv = jnp.sum(valid).astype(jnp.float32)
    step_end = active & (j == mk - 1)
    client_end = step_end & (step == sk - 1)
    mean_g = tmap(lambda a: a / bk.astype(jnp.float32), acc)
    direction = mean_g
    if prox_mu:
      direction = tmap(lambda d, w, w0: d + prox_mu * (w - w0), direction,
                       st.params, params)
    if pr.correction is not None:
      direction = tmap(lambda d, cc: d + cc[c], direction, pr.correction)
    new_mom = (tmap(lambda v, d: momentum * v + d, st.mom, direction)
               if momentum else direction)
    stepped = tmap(lambda w, v: w - lrk * v, st.params, new_mom)
    sel = lambda flag, a, z: tmap(lambda x, y: jnp.where(flag, x, y), a, z)
    loss = st.loss.at[c].add(jnp.where(active, lsum, 0.0))
    gsq, trace, nsteps = st.gsq, st.trace, st.nsteps
    small_sq, inv_n = st.small_sq, st.inv_n
    if noise_stats:
      small_sq = small_sq + jnp.where(nv > 0, _sq_norm(g) / jnp.maximum(
          nv, 1.0) ** 2, 0.0)
      inv_n = inv_n + jnp.where(nv > 0, 1.0 / jnp.maximum(nv, 1.0), 0.0)
      est = step_end & (mk >= 2)
      g_sq, tr = noise.two_batch_estimates(
          small_sq / mk, mk / jnp.maximum(inv_n, 1e-12), _sq_norm(mean_g),
          bk)
      gsq = gsq.at[c].add(jnp.where(est, g_sq, 0.0))
      trace = trace.at[c].add(jnp.where(est, tr, 0.0))
      nsteps = nsteps.at[c].add(est.astype(jnp.int32))
      small_sq = jnp.where(step_end, 0.0, small_sq)
      inv_n = jnp.where(step_end, 0.0, inv_n)
    new_params = sel(step_end, stepped, st.params)
    mom = sel(step_end, new_mom, st.mom) if momentum else st.mom
    return st._replace(
        params=new_params, acc=sel(step_end, zeros, acc), mom=mom,
        ptr=st.ptr + client_end.astype(jnp.int32),
        u=jnp.where(client_end, 0, st.u + active.astype(jnp.int32)),
        small_sq=small_sq, inv_n=inv_n, loss=loss, gsq=gsq, trace=trace,
        nsteps=nsteps), (client_end, c)

  def client_end_fn(pr: _Prep, st: _Lane, client_end, c) -> _Lane:
    params = pr.params
    zeros = tmap(jnp.zeros_like, params)
    sel = lambda flag, a, z: tmap(lambda x, y: jnp.where(flag, x, y), a, z)
    delta = tmap(jnp.subtract, st.params, params)
    wk = jnp.where(client_end, pr.weights[c], 0.0)
    agg = tmap(lambda a, d: a + wk * d, st.agg, delta)
    usq, hsum = st.usq, st.hsum
    if noise_stats:
      scale = -1.0 / (pr.lr[c] * jnp.maximum(pr.s[c], 1).astype(jnp.float32))
      mean_update = tmap(lambda d: d * scale, delta)
      usq = usq.at[c].add(jnp.where(client_end, _sq_norm(mean_update), 0.))
      hsum = tmap(lambda h, d: h + jnp.where(client_end, d, 0.0), hsum,
                  mean_update)
    last = sel(client_end, delta, st.last) if per_client_outputs else st.last
    mom = sel(client_end, zeros, st.mom) if momentum else st.mom
    return st._replace(params=sel(client_end, params, st.params), agg=agg,
                       usq=usq, hsum=hsum, last=last, mom=mom)

  def run_lanes(pr: _Prep, first_lane, num_lanes: int):
    """Runs lanes ``first_lane ... + num_lanes - 1`` to their end and sums
    what they accumulated over the lanes."""
    K = pr.n.shape[0]
    params = pr.params
    zeros = tmap(jnp.zeros_like, params)
    Lh = num_lanes
    bcast = lambda t: tmap(lambda a: jnp.broadcast_to(a, (Lh,) + a.shape), t)
    fz = jnp.zeros((Lh,), jnp.float32)
    fk = jnp.zeros((Lh, K), jnp.float32)
    init = _Lane(
        params=bcast(params), acc=bcast(zeros),
        mom=bcast(zeros) if momentum else zeros,
        agg=bcast(zeros), hsum=bcast(zeros) if noise_stats else zeros,
        last=bcast(zeros) if per_client_outputs else zeros,
        ptr=jnp.zeros((Lh,), jnp.int32), u=jnp.zeros((Lh,), jnp.int32),
        small_sq=fz, inv_n=fz, loss=fk, gsq=fk, trace=fk,
        nsteps=jnp.zeros((Lh, K), jnp.int32), usq=fk)
    axes = _Lane(params=0, acc=0, mom=0 if momentum else None, agg=0,
                 hsum=0 if noise_stats else None,
                 last=0 if per_client_outputs else None, ptr=0, u=0,
                 small_sq=0, inv_n=0, loss=0, gsq=0, trace=0, nsteps=0, usq=0)
    step_all = jax.vmap(slot, in_axes=(None, axes, 0), out_axes=(axes, 0))
    end_all = jax.vmap(client_end_fn, in_axes=(None, axes, 0, 0),
                       out_axes=axes)
    lane_ids = first_lane + jnp.arange(Lh, dtype=jnp.int32)
    total = jnp.max(pr.load[lane_ids])
    if loop_axis_name is not None:
      total = jax.lax.pmax(total, loop_axis_name)

    def body(_, st):
      # Client ends are rare (one per s_k * m_k slots per lane): their
      # O(params) work (delta, aggregate, noise sums, reset) runs only in
      # slots where some lane finishes a client.
      st, (ce, c) = step_all(pr, st, lane_ids)
      any_end = jnp.any(ce)
      if loop_axis_name is not None:  # keep the predicate unbatched
        any_end = jax.lax.pmax(any_end.astype(jnp.int32), loop_axis_name) > 0
      return jax.lax.cond(any_end, lambda s: end_all(pr, s, ce, c),
                          lambda s: s, st)

    final = jax.lax.fori_loop(0, total, body, init)
    sums = dict(agg=tmap(lambda a: a.sum(0), final.agg),
                loss=final.loss.sum(0), gsq=final.gsq.sum(0),
                trace=final.trace.sum(0), nsteps=final.nsteps.sum(0),
                usq=final.usq.sum(0))
    if noise_stats:
      sums["hsum"] = tmap(lambda h: h.sum(0), final.hsum)
    if per_client_outputs:
      local = pr.lane_of - first_lane
      mine = (pr.s > 0) & (local >= 0) & (local < Lh)
      idx = jnp.clip(local, 0, Lh - 1)
      sums["last"] = tmap(
          lambda a: jnp.where(mine.reshape((K,) + (1,) * (a.ndim - 1)),
                              a[idx], 0.0), final.last)
    return sums

  def sharded_lanes(pr: _Prep, L: int):
    def local(pr):
      dev = jax.lax.axis_index(axis_name).astype(jnp.int32)
      sums = run_lanes(pr, dev * (L // D), L // D)
      return jax.lax.psum(sums, axis_name)
    spec = jax.sharding.PartitionSpec()
    return jax.shard_map(local, mesh=mesh, in_specs=(spec,), out_specs=spec,
                         check_vma=False)(pr)

  def kernel(params, data: federated.FederatedData, cohort, plan: Plan,
             weights, key, correction=None) -> RoundOutput:
    K = cohort.shape[0]
    L = K if per_client_outputs else max(1, min(int(lanes), K))
    L = -(-L // D) * D
    n_max = data.y.shape[1]
    n = data.num_examples[cohort]
    b = jnp.maximum(plan.batch_size.astype(jnp.int32), 1)
    s = jnp.maximum(plan.steps.astype(jnp.int32), 0)
    lr = plan.lr.astype(jnp.float32)
    m = (b + mu - 1) // mu
    slots = s * m
    perm = federated.client_permutations(key, cohort, n, n_max)
    lane_of, start, load = pack_lanes(slots, L)
    order = jnp.lexsort((start, lane_of)).astype(jnp.int32)
    count = jnp.bincount(lane_of, length=L + 1)[:L].astype(jnp.int32)
    begin = (jnp.cumsum(count) - count).astype(jnp.int32)
    if mesh is None:
      x, y, row_of = data.x, data.y, cohort
    else:  # the cohort's rows, gathered from the client-sharded data
      x, y = data.x[cohort], data.y[cohort]
      row_of = jnp.arange(K, dtype=jnp.int32)
    pr = _Prep(params, x, y, row_of, n, b, m, s, lr, perm, order, count,
               begin, load, lane_of, weights.astype(jnp.float32), correction)
    if mesh is None:
      sums = run_lanes(pr, jnp.int32(0), L)
    else:
      sums = sharded_lanes(pr, L)
    total = jnp.max(load)

    examples = b * s
    nst = sums["nsteps"]
    denom = jnp.maximum(nst, 1).astype(jnp.float32)
    stats = ClientStats(
        loss=sums["loss"] / jnp.maximum(examples, 1).astype(jnp.float32),
        examples=examples, steps=s,
        grad_sq=sums["gsq"] / denom, trace=sums["trace"] / denom,
        noise_steps=nst, update_sq=sums["usq"])
    taking_part = (s > 0).astype(jnp.float32)
    kp = jnp.maximum(taking_part.sum(), 1.0)
    if noise_stats:
      hmean = tmap(lambda h: h / kp, sums["hsum"])
      heterogeneity = jnp.maximum(
          stats.update_sq.sum() / kp - _sq_norm(hmean), 0.0)
    else:
      heterogeneity = jnp.zeros((), jnp.float32)
    return RoundOutput(
        delta=sums["agg"], stats=stats,
        heterogeneity=heterogeneity, slots=total * L,
        useful=examples.sum(),
        client_delta=sums["last"] if per_client_outputs else None)

  return kernel
