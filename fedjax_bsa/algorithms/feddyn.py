"""FedDyn (Acar et al., "Federated Learning Based on Dynamic
Regularization", ICLR 2021, Algorithm 1).

Client ``k`` minimises ``L_k(w) - <g_k, w> + alpha/2 |w - x|^2``, ``g_k``
its linear term (``nabla L_k`` at its last local model, 0 at first): the
:func:`~.base.pull` with ``mu = alpha`` and correction ``-g_k``. After the
round, for the participants ``P``::

  g_k <- g_k - alpha (w_k - x)
  h   <- h - alpha (1/N) sum_{k in P} (w_k - x)
  x+  =  (1/|P|) sum_{k in P} w_k - h / alpha

so the aggregate is the plain mean of the client models and the server
update subtracts ``h / alpha`` (applied through the server optimizer as
the delta ``mean_k (w_k - x) - h / alpha``; ``server_optimizer=sgd``,
``server_lr=1`` is the paper's update). The state ``h`` and ``g_k [N,
...]`` is the algorithm's server state.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_bsa.algorithms import base
from fedjax_bsa.core import registry

__all__ = ["FedDynState", "feddyn"]

tmap = jax.tree.map


class FedDynState(NamedTuple):
  h: Any         # params tree, the server's h
  clients: Any   # params tree [N, ...], the clients' g_k


@registry.ALGORITHMS.register("feddyn")
def feddyn(cfg) -> base.Algorithm:
  """FedDyn with weight ``feddyn_alpha`` and the configured client
  optimizer."""
  tx, client_init = base.pulled_client(cfg, with_correction=True)

  def init(params, num_clients):
    return FedDynState(tmap(jnp.zeros_like, params), tmap(
        lambda a: jnp.zeros((num_clients,) + a.shape, a.dtype), params))

  def client_inputs(state, cohort, hparams):
    alpha = jnp.full(cohort.shape, hparams["feddyn_alpha"], jnp.float32)
    return {"mu": alpha,
            "correction": tmap(lambda g: -g[cohort], state.clients)}

  def server_update(state, result: base.RoundResult, hparams):
    alpha = hparams["feddyn_alpha"]
    took = result.steps > 0

    def per_leaf(h, g, d):
      mask = took.reshape((-1,) + (1,) * (d.ndim - 1))
      d = jnp.where(mask, d, 0.0)
      g = g.at[result.cohort].add(-alpha * d)
      return h - alpha * d.sum(0) / result.num_clients, g

    out = tmap(per_leaf, state.h, state.clients, result.client_deltas)
    treedef = jax.tree.structure(state.h)
    leaves = treedef.flatten_up_to(out)
    h = treedef.unflatten([l[0] for l in leaves])
    clients = treedef.unflatten([l[1] for l in leaves])
    delta = tmap(lambda m, hh: m - hh / alpha, result.delta, h)
    return delta, FedDynState(h, clients)

  return base.Algorithm(tx, client_init, init, client_inputs,
                        base.uniform_weights, server_update,
                        client_deltas=True)
