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
  """Lanes used when the config says 0: about four clients per lane."""
  return max(1, -(-cohort_size // 4))


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


def make_round_kernel(apply_fn: Callable, *, microbatch: int, lanes: int,
                      noise_stats: bool = True, prox_mu: float = 0.0,
                      momentum: float = 0.0,
                      per_client_outputs: bool = False):
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

  Returns:
    ``kernel(params, data, cohort, plan, weights, key, correction=None)``
    returning a :class:`RoundOutput`. ``cohort`` is int32 ``[K]`` client ids,
    ``weights`` float32 ``[K]`` aggregation weights, ``correction`` an
    optional params tree with a leading ``[K]`` axis added to each client's
    gradient (SCAFFOLD's ``c - c_k``). The caller owns ``jit``; shapes
    depend only on the model, ``K``, ``mu`` and ``L``, never on the plan.
  """
  mu = int(microbatch)
  loss_fn = functools.partial(models.example_losses, apply_fn)

  def kernel(params, data: federated.FederatedData, cohort, plan: Plan,
             weights, key, correction=None) -> RoundOutput:
    K = cohort.shape[0]
    L = K if per_client_outputs else max(1, min(int(lanes), K))
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
    zeros = tmap(jnp.zeros_like, params)
    offsets = jnp.arange(mu, dtype=jnp.int32)

    def slot(st: _Lane, lane) -> _Lane:
      active = st.ptr < count[lane]
      c = order[jnp.clip(begin[lane] + st.ptr, 0, K - 1)]
      bk, mk, sk, lrk = b[c], m[c], s[c], lr[c]
      step, j = st.u // mk, st.u % mk
      within = j * mu + offsets
      valid = active & (within < bk)
      rows = federated.example_index(perm[c], n[c], step * bk + within)
      xb = data.x[cohort[c], rows]
      yb = data.y[cohort[c], rows]

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
      if correction is not None:
        direction = tmap(lambda d, cc: d + cc[c], direction, correction)
      new_mom = (tmap(lambda v, d: momentum * v + d, st.mom, direction)
                 if momentum else direction)
      stepped = tmap(lambda w, v: w - lrk * v, st.params, new_mom)
      delta = tmap(jnp.subtract, stepped, params)
      sel = lambda flag, a, z: tmap(lambda x, y: jnp.where(flag, x, y), a, z)

      loss = st.loss.at[c].add(jnp.where(active, lsum, 0.0))
      gsq, trace, nsteps, usq = st.gsq, st.trace, st.nsteps, st.usq
      small_sq, inv_n, hsum = st.small_sq, st.inv_n, st.hsum
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
        scale = -1.0 / (lrk * jnp.maximum(sk, 1).astype(jnp.float32))
        mean_update = tmap(lambda d: d * scale, delta)
        usq = usq.at[c].add(jnp.where(client_end, _sq_norm(mean_update), 0.))
        hsum = tmap(lambda h, d: h + jnp.where(client_end, d, 0.0), hsum,
                    mean_update)

      wk = jnp.where(client_end, weights[c], 0.0)
      agg = tmap(lambda a, d: a + wk * d, st.agg, delta)
      last = sel(client_end, delta, st.last) if per_client_outputs else st.last
      new_params = sel(client_end, params, sel(step_end, stepped, st.params))
      mom = st.mom
      if momentum:
        mom = sel(client_end, zeros, sel(step_end, new_mom, st.mom))
      return _Lane(
          params=new_params, acc=sel(step_end, zeros, acc), mom=mom, agg=agg,
          hsum=hsum, last=last,
          ptr=st.ptr + client_end.astype(jnp.int32),
          u=jnp.where(client_end, 0, st.u + active.astype(jnp.int32)),
          small_sq=small_sq, inv_n=inv_n, loss=loss, gsq=gsq, trace=trace,
          nsteps=nsteps, usq=usq)

    bcast = lambda t: tmap(lambda a: jnp.broadcast_to(a, (L,) + a.shape), t)
    fz = jnp.zeros((L,), jnp.float32)
    fk = jnp.zeros((L, K), jnp.float32)
    init = _Lane(
        params=bcast(params), acc=bcast(zeros),
        mom=bcast(zeros) if momentum else zeros,
        agg=bcast(zeros), hsum=bcast(zeros) if noise_stats else zeros,
        last=bcast(zeros) if per_client_outputs else zeros,
        ptr=jnp.zeros((L,), jnp.int32), u=jnp.zeros((L,), jnp.int32),
        small_sq=fz, inv_n=fz, loss=fk, gsq=fk, trace=fk,
        nsteps=jnp.zeros((L, K), jnp.int32), usq=fk)
    axes = _Lane(params=0, acc=0, mom=0 if momentum else None, agg=0,
                 hsum=0 if noise_stats else None,
                 last=0 if per_client_outputs else None, ptr=0, u=0,
                 small_sq=0, inv_n=0, loss=0, gsq=0, trace=0, nsteps=0, usq=0)
    step_all = jax.vmap(slot, in_axes=(axes, 0), out_axes=axes)
    lane_ids = jnp.arange(L, dtype=jnp.int32)
    total = jnp.max(load)
    final = jax.lax.fori_loop(0, total, lambda _, st: step_all(st, lane_ids),
                              init)

    examples = b * s
    nst = final.nsteps.sum(0)
    denom = jnp.maximum(nst, 1).astype(jnp.float32)
    stats = ClientStats(
        loss=final.loss.sum(0) / jnp.maximum(examples, 1).astype(jnp.float32),
        examples=examples, steps=s,
        grad_sq=final.gsq.sum(0) / denom, trace=final.trace.sum(0) / denom,
        noise_steps=nst, update_sq=final.usq.sum(0))
    taking_part = (s > 0).astype(jnp.float32)
    kp = jnp.maximum(taking_part.sum(), 1.0)
    if noise_stats:
      hmean = tmap(lambda h: h.sum(0) / kp, final.hsum)
      heterogeneity = jnp.maximum(
          stats.update_sq.sum() / kp - _sq_norm(hmean), 0.0)
    else:
      heterogeneity = jnp.zeros((), jnp.float32)
    client_delta = None
    if per_client_outputs:
      idx = jnp.minimum(lane_of, L - 1)
      client_delta = tmap(
          lambda a: jnp.where((s > 0).reshape((K,) + (1,) * (a.ndim - 1)),
                              a[idx], 0.0), final.last)
    return RoundOutput(
        delta=tmap(lambda a: a.sum(0), final.agg), stats=stats,
        heterogeneity=heterogeneity, slots=total * L,
        useful=examples.sum(), client_delta=client_delta)

  return kernel
