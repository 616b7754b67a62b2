"""FedAvg, FedProx and FedNova: one client loop, three ways to weigh it.

* FedAvg (McMahan et al. 2017): ``c_k = n_k / sum n``, ``n_k`` the examples
  client ``k`` processed this round.
* FedProx (Li et al. MLSys 2020): FedAvg's weights; clients minimise
  ``f_k(w) + mu/2 |w - x|^2`` (the :func:`~.base.pull` with ``mu =
  prox_mu``).
* FedNova (Wang et al. NeurIPS 2020): ``x+ = x - tau_eff sum_k p_k d_k /
  |a_k|_1`` with ``d_k = x - x_k``, ``p_k`` the data share, ``|a_k|_1`` from
  :func:`~.base.fednova_a_norm` and ``tau_eff = sum_k p_k |a_k|_1``; so
  ``c_k = tau_eff p_k / |a_k|_1``. With a client Adam the normalisation is
  ``tau_k`` (FedNova's analysis covers SGD with momentum only).
"""

from __future__ import annotations

import jax.numpy as jnp

from fedjax_bsa.algorithms import base
from fedjax_bsa.core import registry

__all__ = ["fedavg", "fedprox", "fednova", "fednova_weights"]


@registry.ALGORITHMS.register("fedavg")
def fedavg(cfg) -> base.Algorithm:
  """FedAvg with the configured client optimizer."""
  tx, client_init = base.plain_client(cfg)
  return base.Algorithm(tx, client_init, base.no_state, base.no_inputs,
                        base.example_weights, base.pass_through)


@registry.ALGORITHMS.register("fedprox")
def fedprox(cfg) -> base.Algorithm:
  """FedProx: FedAvg plus the proximal pull ``prox_mu (w - x)``."""
  tx, client_init = base.pulled_client(cfg, with_correction=False)

  def client_inputs(state, cohort, hparams):
    del state
    return {"mu": jnp.full(cohort.shape, hparams["prox_mu"], jnp.float32)}

  return base.Algorithm(tx, client_init, base.no_state, client_inputs,
                        base.example_weights, base.pass_through)


def fednova_weights(steps, data_sizes, momentum: float = 0.0, lr=None):
  """FedNova's ``c_k = tau_eff p_k / |a_k|_1`` (0 for absent clients).

  With per-client learning rates ``lr`` (a controller that sets each
  client's rate) ``a_k`` is counted in units of the rate, ``eta_k |a_k|_1``
  (the client's displacement: the sum of its step sizes), and ``tau_eff =
  sum_k p_k eta_k |a_k|_1``, so the normalised update is each client's mean
  gradient whatever its rate and steps; with one rate for all it cancels
  and this is Wang et al.'s formula.

  >>> fednova_weights(jnp.array([2, 4]), jnp.array([1, 1])).tolist()
  [0.75, 0.375]
  >>> fednova_weights(jnp.array([2, 4]), jnp.array([1, 1]),
  ...                 lr=jnp.array([0.2, 0.1])).tolist()   # same eta * tau
  [0.5, 0.5]
  """
  taking_part = steps > 0
  p = jnp.where(taking_part, data_sizes, 0).astype(jnp.float32)
  p = p / jnp.maximum(p.sum(), 1.0)
  a = base.fednova_a_norm(steps, momentum)
  if lr is not None:
    a = a * jnp.where(taking_part, jnp.asarray(lr, jnp.float32), 0.0)
  tau_eff = jnp.sum(p * a)
  return jnp.where(taking_part, tau_eff * p / jnp.maximum(a, 1e-12), 0.0)


@registry.ALGORITHMS.register("fednova")
def fednova(cfg) -> base.Algorithm:
  """FedNova's normalised averaging with the configured client optimizer."""
  tx, client_init = base.plain_client(cfg)
  rho = base.client_momentum(cfg)

  def weights(examples, steps, data_sizes, hparams=None, lr=None):
    del examples, hparams
    return fednova_weights(steps, data_sizes, rho, lr)

  return base.Algorithm(tx, client_init, base.no_state, base.no_inputs,
                        weights, base.pass_through)
