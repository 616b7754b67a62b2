"""SCAFFOLD, option II (Karimireddy et al. ICML 2020).

Clients add ``c - c_k`` to every gradient (the :func:`~.base.pull`'s
correction); afterwards ``c_k+ = c_k - c + (x - x_k) / (tau_k lr_k)`` and
``c += (1/N) sum_k (c_k+ - c_k)``; aggregation as FedAvg. The control
variates ``c`` and ``c_k [N, ...]`` are the algorithm's server state.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_bsa.algorithms import base
from fedjax_bsa.core import registry

__all__ = ["ScaffoldState", "scaffold", "control_update"]

tmap = jax.tree.map


class ScaffoldState(NamedTuple):
  server: Any    # params tree, c
  clients: Any   # params tree [N, ...], c_k


def control_update(c_server, c_clients, cohort, client_delta, steps, lr,
                   num_clients: int):
  """SCAFFOLD option II control-variate update.

  Args:
    c_server: params tree, the server control variate ``c``.
    c_clients: params tree with leading ``[N]`` axis, the ``c_k``.
    cohort: int32 ``[K]`` ids of this round's clients.
    client_delta: params tree ``[K, ...]``, ``x_k - x``.
    steps: int32 ``[K]`` local steps (0: absent, variates unchanged).
    lr: float32 ``[K]`` client learning rates.
    num_clients: ``N``.

  Returns:
    ``(c_server, c_clients)`` updated.
  """
  took = steps > 0
  scale = jnp.where(took, -1.0 / (jnp.maximum(steps, 1) * lr), 0.0)

  def per_leaf(cs, cc, d):
    shape = (-1,) + (1,) * (d.ndim - 1)
    old = cc[cohort]
    new = old - cs[None] + d * scale.reshape(shape)
    new = jnp.where(took.reshape(shape), new, old)
    return cs + (new - old).sum(0) / num_clients, cc.at[cohort].set(new)

  out = tmap(per_leaf, c_server, c_clients, client_delta)
  treedef = jax.tree.structure(c_server)
  leaves = treedef.flatten_up_to(out)
  return (treedef.unflatten([l[0] for l in leaves]),
          treedef.unflatten([l[1] for l in leaves]))


@registry.ALGORITHMS.register("scaffold")
def scaffold(cfg) -> base.Algorithm:
  """SCAFFOLD with the configured client optimizer."""
  tx, client_init = base.pulled_client(cfg, with_correction=True)

  def init(params, num_clients):
    zeros = tmap(jnp.zeros_like, params)
    return ScaffoldState(zeros, tmap(
        lambda a: jnp.zeros((num_clients,) + a.shape, a.dtype), params))

  def client_inputs(state, cohort, hparams):
    del hparams
    corr = tmap(lambda cs, cc: cs[None] - cc[cohort], state.server,
                state.clients)
    return {"mu": jnp.zeros(cohort.shape, jnp.float32), "correction": corr}

  def server_update(state, result: base.RoundResult, hparams):
    del hparams
    server, clients = control_update(
        state.server, state.clients, result.cohort, result.client_deltas,
        result.steps, result.lr, result.num_clients)
    return result.delta, ScaffoldState(server, clients)

  return base.Algorithm(tx, client_init, init, client_inputs,
                        base.example_weights, server_update,
                        client_deltas=True)
