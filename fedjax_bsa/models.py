"""Flax models, used through a pure ``apply(params, x) -> logits``.

Each model is built by :func:`make_model`, which returns a :class:`Model`
holding ``init(key) -> params`` and ``apply(params, x) -> logits``; the rest
of the simulator sees only these two pure functions and the loss.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

__all__ = ["Model", "MLP", "CNN1D", "CNN", "make_model", "example_losses"]


class Model(NamedTuple):
  """A model as two pure functions plus its input shape."""
  init: Callable[[jax.Array], dict]   # key -> params
  apply: Callable[[dict, jax.Array], jax.Array]  # params, x[B, ...] -> [B, C]
  input_shape: tuple[int, ...]
  num_classes: int
  name: str


class MLP(nn.Module):
  """Fully connected ReLU network (``hidden`` empty: logistic regression)."""
  hidden: Sequence[int]
  num_classes: int

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)


class CNN1D(nn.Module):
  """A small 1-D CNN for MNIST-1D (inputs ``[B, L]``)."""
  num_classes: int
  channels: int = 32

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1, 1))
    for _ in range(3):
      x = nn.relu(nn.Conv(self.channels, (5,), strides=(2,))(x))
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
  """A small 2-D CNN for images (inputs ``[B, H, W]`` or ``[B, H, W, C]``)."""
  num_classes: int
  channels: int = 32

  @nn.compact
  def __call__(self, x):
    if x.ndim == 3:
      x = x[..., None]
    x = nn.relu(nn.Conv(self.channels, (3, 3))(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(2 * self.channels, (3, 3))(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(128)(x))
    return nn.Dense(self.num_classes)(x)


def make_model(name: str, input_shape: Sequence[int], num_classes: int, *,
               hidden: int = 256) -> Model:
  """Builds a model by name.

  Args:
    name: ``mlp`` (one hidden layer of ``hidden`` units), ``logreg``,
      ``cnn1d`` or ``cnn``.
    input_shape: shape of one example (without the batch axis).
    num_classes: number of output logits.
    hidden: hidden width of the MLP.

  Returns:
    A :class:`Model`.

  >>> m = make_model("mlp", (64,), 10, hidden=32)
  >>> p = m.init(jax.random.key(0))
  >>> m.apply(p, jnp.zeros((3, 64))).shape
  (3, 10)
  """
  if name == "mlp":
    module = MLP((hidden,), num_classes)
  elif name == "logreg":
    module = MLP((), num_classes)
  elif name == "cnn1d":
    module = CNN1D(num_classes)
  elif name == "cnn":
    module = CNN(num_classes)
  else:
    raise ValueError(f"model={name!r} is not allowed: choose one of mlp, "
                     "logreg, cnn1d, cnn")
  shape = tuple(input_shape)

  def init(key):
    return module.init(key, jnp.zeros((1,) + shape, jnp.float32))["params"]

  def apply(params, x):
    return module.apply({"params": params}, x)

  return Model(init, apply, shape, num_classes, name)


def example_losses(apply, params, x, y):
  """Per-example softmax cross-entropy, ``[B]``, for integer labels ``y[B]``."""
  logits = apply(params, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y)
