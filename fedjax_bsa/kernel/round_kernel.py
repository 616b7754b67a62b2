"""The round kernel: every client job of a round in one compiled update.

See ``docs/design.md`` ("The round kernel"); the lane loop itself is in
:mod:`fedjax_bsa.kernel.lanes`. A *job* is one client's local
training in one experiment: ``s_j`` steps of batch ``b_j`` at learning rate
``lr_j``, starting from its experiment's server parameters. A step is
``m_j = ceil(b_j / mu)`` *slots* of ``mu`` examples (the last one masked
when ``mu`` does not divide ``b_j``) whose gradients are summed and applied
at the step's last slot through the algorithm's client transformation
(an optax ``GradientTransformation``): ``w <- w - lr_j * tx(mean grad)``.
Jobs of all experiments share one pool of ``L`` vmapped lanes
(:mod:`fedjax_bsa.kernel.layout`); at a job's end the lane adds ``c_j (x_j -
x_e)`` into its experiment's aggregate, then resets to the next job's
server parameters and client state. A job whose parameters went
non-finite is left out of every aggregate, as a server rejects a failed
client, and reports ``update_sq = NaN`` so that the controller sees it.
The lanes advance in lock step for as many slots as the fullest lane needs,
a count known only on device, so the loop is a ``fori_loop`` with a traced
trip count: one compile serves every plan, and the work done is the packed
work of all experiments together.

The kernel is blind to algorithms: it runs any client transformation whose
state ``client_init(server_params, client_input)`` rebuilds per job.

Semantics equal :func:`fedjax_bsa.kernel.reference.reference_round`, a
per-client loop with exact shapes: step ``t`` of job ``j`` on client ``c`` uses
the rows at stream positions ``t * b_j + i`` (``i < b_j``, taken mod ``n_c``) of
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

from fedjax_bsa.core.types import ClientStats
from fedjax_bsa.core.types import Jobs
from fedjax_bsa.data import federated
from fedjax_bsa.kernel import lanes as lanes_lib
from fedjax_bsa.kernel import layout as layout_lib

__all__ = ["Jobs", "ClientStats", "failed_jobs", "RoundOutput",
           "make_round_kernel", "cohort_rows"]

tmap = jax.tree.map


def failed_jobs(stats: ClientStats) -> jax.Array:
  """bool ``[J]``: jobs that ran and whose model went non-finite (left out
  of the aggregate; their ``update_sq`` or loss is not finite)."""
  return (stats.steps > 0) & ~(jnp.isfinite(stats.loss)
                               & jnp.isfinite(stats.update_sq))


class RoundOutput(NamedTuple):
  delta: Any              # [E, ...] sum_j c_j (x_j - x_e), a params tree
  stats: ClientStats      # [J]
  update_sum_sq: jax.Array  # float32 [E], |sum_j h_j|^2 of mean applied grads
  slots: jax.Array        # int32 [], microbatches computed (lanes x loop
                          # iterations x per_slot)
  useful: jax.Array       # int32 [], examples that carried data
  client_deltas: Any      # [J, ...] x_j - x_e, or None


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
      fixed cost on accelerators; see :func:`fedjax_bsa.kernel.layout.choose`).
    num_experiments: ``E``, the leading axis of the server parameters.
    noise_stats: also estimate ``|G|^2`` and ``tr(Sigma)`` per job, with the
      finite-population correction of :func:`fedjax_bsa.kernel.noise.
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
    ``J``, ``E``, ``mu``, ``R``, ``L`` and ``D``, never on the plan.
  """
  spec = lanes_lib.Spec(loss_fn, client_tx, client_init, int(microbatch),
                        max(1, int(per_slot)), int(num_experiments),
                        bool(noise_stats), bool(client_deltas))
  D = 1 if mesh is None else int(mesh.shape[axis_name])
  L = -(-max(1, int(lanes)) // D) * D

  def run(rd: lanes_lib.Round) -> lanes_lib.Shared:
    if mesh is None:
      return lanes_lib.run_lanes(spec, rd, jnp.int32(0), L)

    def local(rd):
      dev = jax.lax.axis_index(axis_name).astype(jnp.int32)
      return jax.lax.psum(lanes_lib.run_lanes(spec, rd, dev * (L // D),
                                              L // D), axis_name)
    rep = jax.sharding.PartitionSpec()
    return jax.shard_map(local, mesh=mesh, in_specs=(rep,), out_specs=rep,
                         check_vma=False)(rd)

  def kernel(server_params, data: federated.FederatedData, jobs: Jobs,
             client_inputs=None) -> RoundOutput:
    b = jnp.maximum(jobs.batch.astype(jnp.int32), 1)
    s = jnp.maximum(jobs.steps.astype(jnp.int32), 0)
    jobs = jobs._replace(batch=b, steps=s, lr=jobs.lr.astype(jnp.float32),
                         weight=jobs.weight.astype(jnp.float32))
    m = layout_lib.slots_per_step(b, spec.microbatch, spec.per_slot)
    lay = layout_lib.make_layout(s * m, L)
    sh = run(lanes_lib.Round(server_params, data, jobs, client_inputs, m,
                             lay))
    examples = b * s
    denom = jnp.maximum(sh.nsteps, 1).astype(jnp.float32)
    stats = ClientStats(
        loss=sh.loss / jnp.maximum(examples, 1).astype(jnp.float32),
        examples=examples, steps=s, grad_sq=sh.gsq / denom,
        trace=sh.trace / denom, noise_steps=sh.nsteps, update_sq=sh.usq)
    usum = (jax.vmap(lanes_lib.sq_norm)(sh.hsum) if noise_stats
            else jnp.zeros((spec.experiments,), jnp.float32))
    return RoundOutput(sh.agg, stats, usum,
                       jnp.max(lay.load) * L * spec.per_slot,
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
