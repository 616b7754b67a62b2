"""Client objectives, aggregation rules and server optimizers.

The round kernel returns ``sum_k c_k (x_k - x)`` for per-client coefficients
``c_k``; an algorithm is the choice of ``c_k`` (plus a client-side term the
kernel applies: FedProx's proximal weight, SCAFFOLD's correction). The
server then takes an optax step on the pseudo-gradient ``-sum_k c_k (x_k - x)``.

* FedAvg (McMahan et al. 2017): ``c_k = n_k / sum n``, ``n_k`` the examples
  client ``k`` processed this round.
* FedProx (Li et al. 2020): FedAvg's weights; clients minimise
  ``f_k(w) + mu/2 |w - x|^2``.
* FedNova (Wang et al. 2020): ``x+ = x - tau_eff sum_k p_k d_k / |a_k|_1``
  with ``d_k = x - x_k``, ``p_k`` the data share, ``|a_k|_1 = tau_k`` for SGD
  and ``(tau - rho (1 - rho^tau) / (1 - rho)) / (1 - rho)`` with momentum
  ``rho``, and ``tau_eff = sum_k p_k |a_k|_1``; so ``c_k = tau_eff p_k / |a_k|_1``.
* SCAFFOLD (Karimireddy et al. 2020), option II: clients add ``c - c_k`` to
  every gradient; afterwards ``c_k+ = c_k - c + (x - x_k) / (tau_k lr_k)`` and
  ``c += (1/N) sum_k (c_k+ - c_k)``; aggregation as FedAvg.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

__all__ = ["aggregation_weights", "fednova_a_norm", "server_optimizer",
           "scaffold_update"]

tmap = jax.tree.map


def fednova_a_norm(steps, momentum: float = 0.0):
  """``|a_k|_1`` of FedNova for ``steps`` local SGD steps with momentum."""
  tau = steps.astype(jnp.float32)
  if not momentum:
    return tau
  rho = momentum
  return (tau - rho * (1.0 - rho ** tau) / (1.0 - rho)) / (1.0 - rho)


def aggregation_weights(algorithm: str, examples, steps, data_sizes,
                        momentum: float = 0.0):
  """The coefficients ``c_k`` of the aggregate ``sum_k c_k (x_k - x)``.

  Args:
    algorithm: ``fedavg`` | ``fedprox`` | ``scaffold`` | ``fednova``.
    examples: int32 ``[K]`` examples each client processes (0: absent).
    steps: int32 ``[K]`` local steps.
    data_sizes: int32 ``[K]`` examples each client holds (FedNova's ``p_k``).
    momentum: client momentum (FedNova's ``|a_k|_1``).

  Returns:
    float32 ``[K]``; zero for clients that do no work.
  """
  taking_part = steps > 0
  if algorithm in ("fedavg", "fedprox", "scaffold"):
    e = jnp.where(taking_part, examples, 0).astype(jnp.float32)
    return e / jnp.maximum(e.sum(), 1.0)
  if algorithm == "fednova":
    p = jnp.where(taking_part, data_sizes, 0).astype(jnp.float32)
    p = p / jnp.maximum(p.sum(), 1.0)
    a = fednova_a_norm(steps, momentum)
    tau_eff = jnp.sum(p * a)
    return jnp.where(taking_part, tau_eff * p / jnp.maximum(a, 1e-12), 0.0)
  raise ValueError(f"algorithm={algorithm!r} is not allowed: choose one of "
                   "fedavg, fedprox, fednova, scaffold")


def server_optimizer(name: str, learning_rate, momentum=0.9):
  """The server's optax optimizer (FedAvg, FedAvgM, FedAdam, FedYogi).

  ``sgd`` with ``learning_rate=1`` is plain FedAvg. Adam and Yogi use the
  adaptivity ``eps=1e-3`` of Reddi et al. 2021 (Adaptive Federated
  Optimization).
  """
  if name == "sgd":
    return optax.sgd(learning_rate)
  if name == "momentum":
    return optax.sgd(learning_rate, momentum=momentum)
  if name == "adam":
    return optax.adam(learning_rate, b1=0.9, b2=0.99, eps=1e-3)
  if name == "yogi":
    return optax.yogi(learning_rate, b1=0.9, b2=0.99, eps=1e-3)
  raise ValueError(f"server_optimizer={name!r} is not allowed: choose one of "
                   "sgd, momentum, adam, yogi")


def scaffold_update(c_server, c_clients, cohort, client_delta, steps, lr,
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
