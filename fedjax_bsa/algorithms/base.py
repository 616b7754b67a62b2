"""What a federated algorithm is: pure functions the round kernel runs blind.

An :class:`Algorithm` is a ``NamedTuple`` of functions (fedjax's
``FederatedAlgorithm`` built from client init / step / final, with optax's
``GradientTransformation`` as the client step):

* ``client_tx``: an optax ``GradientTransformation`` that turns a local
  step's mean minibatch gradient into a direction; the kernel applies
  ``w <- w - lr_k * direction`` with the plan's per-client ``lr_k``. Its
  state lives per lane and is rebuilt for every client by
* ``client_init(server_params, client_input) -> client_tx state``, where
  ``client_input`` is the client's slice of what ``client_inputs`` returns
  (SCAFFOLD's ``c - c_k``, FedDyn's ``-g_k``, FedProx's weight);
* ``init(params, num_clients) -> state``: the algorithm's own server state
  (control variates, ...), beside the server optimizer's;
* ``client_inputs(state, cohort, hparams) -> tree [K, ...]``;
* ``weights(examples, steps, data_sizes, hparams) -> [K]``: the coefficients
  ``c_k`` of the aggregate ``sum_k c_k (x_k - x)`` the kernel accumulates;
* ``server_update(state, result, hparams) -> (delta, state)``: from the
  round's :class:`RoundResult` to the delta the server optimizer applies
  (as the pseudo-gradient ``-delta``) and the new state;
* ``client_deltas``: whether ``server_update`` needs every client's own
  ``x_k - x`` (the kernel then also returns them, ``[K, ...]``).

The kernel, the round loop and the driver know no algorithm names; the
algorithms register themselves in :data:`fedjax_bsa.core.registry.ALGORITHMS`
(``factory(cfg) -> Algorithm``).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_bsa.core import registry

__all__ = ["Algorithm", "RoundResult", "ClientPull", "pull",
           "client_optimizer", "server_optimizer", "example_weights",
           "uniform_weights", "fednova_a_norm", "no_inputs", "no_state",
           "pass_through"]

tmap = jax.tree.map


class RoundResult(NamedTuple):
  """What the server sees of one round (one experiment)."""
  delta: Any                 # params tree: sum_k c_k (x_k - x)
  client_deltas: Any         # params tree [K, ...] x_k - x, or None
  cohort: jax.Array          # int32 [K] client ids
  steps: jax.Array           # int32 [K] local steps run (0: absent)
  lr: jax.Array              # float32 [K] client learning rates
  num_clients: int           # N, static


class Algorithm(NamedTuple):
  """A federated algorithm as pure functions (see the module docstring)."""
  client_tx: optax.GradientTransformation
  client_init: Callable[[Any, Any], Any]
  init: Callable[[Any, int], Any]
  client_inputs: Callable[[Any, jax.Array, dict], Any]
  weights: Callable[..., jax.Array]
  server_update: Callable[[Any, RoundResult, dict], tuple[Any, Any]]
  client_deltas: bool = False


# ------------------------------------------------------------ client side


class ClientPull(NamedTuple):
  """State of :func:`pull`: set per client by ``client_init``."""
  anchor: Any        # params tree: the server parameters the client got
  mu: jax.Array      # float32 []: proximal weight
  correction: Any    # params tree added to every gradient, or None


def pull(with_correction: bool) -> optax.GradientTransformation:
  """Adds ``mu (w - anchor) + correction`` to each gradient.

  FedProx's proximal term (Li et al. 2020) is ``mu (w - w_server)``;
  SCAFFOLD's drift correction (Karimireddy et al. 2020) is ``c - c_k``;
  FedDyn's (Acar et al. 2021) is ``alpha (w - w_server) - g_k``. The anchor,
  weight and correction are per client, set by the algorithm's
  ``client_init`` at each client's start (``init`` gives a zero pull).

  Args:
    with_correction: static; carry and add a correction tree.

  >>> tx = pull(False)
  >>> st = ClientPull({"w": jnp.zeros(2)}, jnp.float32(0.5), None)
  >>> d, _ = tx.update({"w": jnp.ones(2)}, st, {"w": jnp.full(2, 2.0)})
  >>> d["w"].tolist()
  [2.0, 2.0]
  """

  def init(params):
    return ClientPull(params, jnp.zeros((), jnp.float32),
                      tmap(jnp.zeros_like, params) if with_correction
                      else None)

  def update(grads, state, params=None):
    out = tmap(lambda g, w, a: g + state.mu * (w - a), grads, params,
               state.anchor)
    if with_correction:
      out = tmap(jnp.add, out, state.correction)
    return out, state

  return optax.GradientTransformation(init, update)


def client_optimizer(cfg) -> optax.GradientTransformation:
  """The configured client optimizer's direction (no learning rate)."""
  return registry.CLIENT_OPTIMIZERS.get(cfg.client_optimizer)(cfg)


@registry.CLIENT_OPTIMIZERS.register("sgd")
def _sgd(cfg):
  """Plain SGD; heavy-ball momentum ``client_momentum`` when it is > 0."""
  if cfg.client_momentum > 0:
    return optax.trace(decay=cfg.client_momentum)
  return optax.identity()


@registry.CLIENT_OPTIMIZERS.register("momentum")
def _momentum(cfg):
  """SGD with heavy-ball momentum ``client_momentum`` (0.9 if unset)."""
  return optax.trace(decay=cfg.client_momentum or 0.9)


@registry.CLIENT_OPTIMIZERS.register("adam")
def _adam(cfg):
  """Adam's direction (Kingma & Ba 2015), its moments reset for every
  client (``client_lr`` is Adam's step size)."""
  del cfg
  return optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8)


def client_momentum(cfg) -> float:
  """The heavy-ball momentum of the client optimizer (0 if none)."""
  if cfg.client_optimizer == "momentum":
    return cfg.client_momentum or 0.9
  if cfg.client_optimizer == "sgd":
    return cfg.client_momentum
  return 0.0


def plain_client(cfg):
  """``(client_tx, client_init)`` of an algorithm with no client pull."""
  tx = client_optimizer(cfg)
  return tx, lambda server_params, client_input: tx.init(server_params)


def pulled_client(cfg, with_correction: bool):
  """``(client_tx, client_init)`` with :func:`pull` before the optimizer;
  ``client_input`` is ``{"mu": [], "correction": tree or absent}``."""
  opt = client_optimizer(cfg)
  tx = optax.chain(pull(with_correction), opt)

  def client_init(server_params, client_input):
    corr = client_input["correction"] if with_correction else None
    return (ClientPull(server_params, client_input["mu"], corr),
            opt.init(server_params))

  return tx, client_init


# ------------------------------------------------------------ server side


def server_optimizer(cfg, learning_rate) -> optax.GradientTransformation:
  """The configured server optimizer (``learning_rate`` may be traced)."""
  return registry.SERVER_OPTIMIZERS.get(cfg.server_optimizer)(
      cfg, learning_rate)


@registry.SERVER_OPTIMIZERS.register("sgd")
def _server_sgd(cfg, lr):
  """FedAvg's server step (``server_lr=1``: the average itself)."""
  del cfg
  return optax.sgd(lr)


@registry.SERVER_OPTIMIZERS.register("momentum")
def _server_momentum(cfg, lr):
  """FedAvgM (Hsu et al. 2019)."""
  return optax.sgd(lr, momentum=cfg.server_momentum)


@registry.SERVER_OPTIMIZERS.register("adam")
def _server_adam(cfg, lr):
  """FedAdam (Reddi et al. ICLR 2021), adaptivity ``eps=1e-3``."""
  del cfg
  return optax.adam(lr, b1=0.9, b2=0.99, eps=1e-3)


@registry.SERVER_OPTIMIZERS.register("yogi")
def _server_yogi(cfg, lr):
  """FedYogi (Reddi et al. ICLR 2021), adaptivity ``eps=1e-3``."""
  del cfg
  return optax.yogi(lr, b1=0.9, b2=0.99, eps=1e-3)


# ---------------------------------------------------- shared small pieces


def example_weights(examples, steps, data_sizes, hparams=None, lr=None):
  """FedAvg's ``c_k = n_k / sum n``, ``n_k`` the examples processed.

  >>> example_weights(jnp.array([10, 30, 0]), jnp.array([1, 3, 0]),
  ...                 None).tolist()
  [0.25, 0.75, 0.0]
  """
  del data_sizes, hparams, lr
  e = jnp.where(steps > 0, examples, 0).astype(jnp.float32)
  return e / jnp.maximum(e.sum(), 1.0)


def uniform_weights(examples, steps, data_sizes, hparams=None, lr=None):
  """``c_k = 1 / |participants|`` (FedDyn's plain mean of client models)."""
  del examples, data_sizes, hparams, lr
  took = (steps > 0).astype(jnp.float32)
  return took / jnp.maximum(took.sum(), 1.0)


def fednova_a_norm(steps, momentum: float = 0.0):
  """``|a_k|_1`` of FedNova for ``steps`` local SGD steps with momentum.

  ``tau`` for plain SGD; ``(tau - rho (1 - rho^tau) / (1 - rho)) / (1 -
  rho)`` with heavy-ball momentum ``rho`` (Wang et al. NeurIPS 2020).

  >>> fednova_a_norm(jnp.array([3])).tolist()
  [3.0]
  """
  tau = steps.astype(jnp.float32)
  if not momentum:
    return tau
  rho = momentum
  return (tau - rho * (1.0 - rho ** tau) / (1.0 - rho)) / (1.0 - rho)


class NoState(NamedTuple):
  """Server state of algorithms that keep none."""


def no_state(params, num_clients):
  del params, num_clients
  return NoState()


def no_inputs(state, cohort, hparams):
  del state, cohort, hparams
  return None


def pass_through(state, result: RoundResult, hparams):
  """A server update that applies the aggregate as it is."""
  del hparams
  return result.delta, state
