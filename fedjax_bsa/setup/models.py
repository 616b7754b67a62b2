"""Flax models, used through a pure ``apply(params, x) -> logits``.

A model is a :class:`Model` holding ``init(key) -> params`` and
``apply(params, x) -> logits``; the rest of the simulator sees only these
two pure functions and the loss. The built-in models register themselves
here in :data:`~fedjax_bsa.core.registry.MODELS`, each a function
``(cfg, input_shape, num_classes)`` that reads its settings from ``cfg`` by
the names of :class:`ModelSettings`: ``mlp`` (:func:`mlp`), ``logreg``
(:func:`logreg`), ``cnn1d`` (:func:`cnn1d`) and ``cnn`` (:func:`cnn`).
:func:`make_model` builds one from its name and the settings as arguments.

The convolution and pooling the CNNs use by default (:func:`patch_conv`,
:func:`slice_max_pool`, :class:`PatchConv`) are in
:mod:`fedjax_bsa.setup.patch_layers`, re-exported here.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fedjax_bsa.core import registry as reg
from fedjax_bsa.setup.patch_layers import conv_patches
from fedjax_bsa.setup.patch_layers import patch_conv
from fedjax_bsa.setup.patch_layers import PatchConv
from fedjax_bsa.setup.patch_layers import slice_max_pool

__all__ = ["evaluate_model", "Model", "MLP", "CNN1D", "CNN", "PatchConv",
           "conv_patches", "patch_conv", "slice_max_pool", "ConvKind", "CONVS",
           "ModelSettings", "model_settings", "flax_model", "mlp", "logreg",
           "cnn1d", "cnn", "make_model", "example_losses"]


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


class ConvKind(NamedTuple):
  """How a CNN computes its convolutions and its max pooling."""
  layer: type       # a flax module class called as nn.Conv is
  pool: Callable    # as nn.max_pool


#: The ``conv`` choices of the CNNs, by name: ``patches`` (windows @ kernel,
#: fast under ``vmap`` over per-lane weights; pooling by slices) or ``flax``
#: (``nn.Conv`` and ``nn.max_pool``); same parameters and outputs either way.
CONVS = {"patches": ConvKind(PatchConv, slice_max_pool),
         "flax": ConvKind(nn.Conv, nn.max_pool)}


def _conv(conv: str) -> ConvKind:
  if conv not in CONVS:
    raise ValueError(f"conv={conv!r} is not allowed: choose one of "
                     f"{', '.join(CONVS)}")
  return CONVS[conv]


class CNN1D(nn.Module):
  """A small 1-D CNN for MNIST-1D (inputs ``[B, L]``).

  ``conv="patches"`` (default) computes the convolutions as windows @ kernel
  (fast under ``vmap`` over per-lane weights); ``conv="flax"`` uses
  ``nn.Conv``. Both have the same parameters and outputs.
  """
  num_classes: int
  channels: int = 32
  conv: str = "patches"

  @nn.compact
  def __call__(self, x):
    conv = _conv(self.conv).layer
    x = x.reshape((x.shape[0], -1, 1))
    for i in range(3):
      x = nn.relu(conv(self.channels, (5,), strides=(2,), name=f"Conv_{i}")(x))
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
  """A small 2-D CNN for images (inputs ``[B, H, W]`` or ``[B, H, W, C]``).

  ``conv`` as in :class:`CNN1D`; ``conv="patches"`` also max-pools with
  :func:`slice_max_pool` (same values and gradients as ``nn.max_pool``,
  whose ``select_and_scatter_add`` backward is slow on the CPU).
  """
  num_classes: int
  channels: int = 32
  conv: str = "patches"

  @nn.compact
  def __call__(self, x):
    if x.ndim == 3:
      x = x[..., None]
    conv, pool = _conv(self.conv)
    x = nn.relu(conv(self.channels, (3, 3), strides=None, name="Conv_0")(x))
    x = pool(x, (2, 2), (2, 2))
    x = nn.relu(conv(2 * self.channels, (3, 3), strides=None,
                     name="Conv_1")(x))
    x = pool(x, (2, 2), (2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(128)(x))
    return nn.Dense(self.num_classes)(x)


# ------------------------------------------------------------ the models


class ModelSettings(NamedTuple):
  """What a built-in model reads, by the names of the
  :class:`~fedjax_bsa.core.config.Config` settings (a config has no
  ``conv``: it takes this default). :func:`make_model` gives a model its
  arguments as one of these; the experiment gives it the config."""
  hidden: int = 256        # hidden width of the MLP
  conv: str = "patches"    # how the CNNs compute convolutions: CONVS


def model_settings(cfg) -> ModelSettings:
  """The settings of a model given ``cfg`` (a config or a
  :class:`ModelSettings`); an unknown ``conv`` names the setting, its value
  and the allowed ones.

  >>> model_settings(ModelSettings(hidden=32))
  ModelSettings(hidden=32, conv='patches')
  """
  get = lambda name: getattr(cfg, name, ModelSettings._field_defaults[name])
  s = ModelSettings(hidden=get("hidden"), conv=get("conv"))
  _conv(s.conv)
  return s


def flax_model(module: nn.Module, input_shape: Sequence[int],
               num_classes: int, name: str) -> Model:
  """The :class:`Model` of a flax module whose ``params`` are its state."""
  shape = tuple(input_shape)

  def init(key):
    return module.init(key, jnp.zeros((1,) + shape, jnp.float32))["params"]

  def apply(params, x):
    return module.apply({"params": params}, x)

  return Model(init, apply, shape, num_classes, name)


@reg.MODELS.register("mlp")
def mlp(cfg, input_shape: Sequence[int], num_classes: int) -> Model:
  """One hidden layer of ``hidden`` ReLU units (:class:`MLP`)."""
  s = model_settings(cfg)
  return flax_model(MLP((s.hidden,), num_classes), input_shape, num_classes,
                    "mlp")


@reg.MODELS.register("logreg")
def logreg(cfg, input_shape: Sequence[int], num_classes: int) -> Model:
  """Logistic regression (:class:`MLP` with no hidden layer)."""
  model_settings(cfg)
  return flax_model(MLP((), num_classes), input_shape, num_classes, "logreg")


@reg.MODELS.register("cnn1d")
def cnn1d(cfg, input_shape: Sequence[int], num_classes: int) -> Model:
  """The 1-D CNN for MNIST-1D (:class:`CNN1D`), convolutions by ``conv``."""
  s = model_settings(cfg)
  return flax_model(CNN1D(num_classes, conv=s.conv), input_shape, num_classes,
                    "cnn1d")


@reg.MODELS.register("cnn")
def cnn(cfg, input_shape: Sequence[int], num_classes: int) -> Model:
  """The 2-D CNN for images (:class:`CNN`), convolutions by ``conv``."""
  s = model_settings(cfg)
  return flax_model(CNN(num_classes, conv=s.conv), input_shape, num_classes,
                    "cnn")


def make_model(name: str, input_shape: Sequence[int], num_classes: int, *,
               hidden: int = 256, conv: str = "patches") -> Model:
  """Builds the model registered as ``name``, given these arguments (as a
  :class:`ModelSettings`).

  Args:
    name: a name in :data:`~fedjax_bsa.core.registry.MODELS`: the built-in
      ``mlp`` (one hidden layer of ``hidden`` units), ``logreg``, ``cnn1d``
      or ``cnn``, or a user's.
    input_shape: shape of one example (without the batch axis).
    num_classes: number of output logits.
    hidden: hidden width of the MLP.
    conv: how the CNNs compute convolutions, one of :data:`CONVS`.

  Returns:
    A :class:`Model`.

  Raises:
    ValueError: unknown model (naming ``model`` and the registered models)
      or ``conv`` (naming the allowed ones).

  >>> m = make_model("mlp", (64,), 10, hidden=32)
  >>> p = m.init(jax.random.key(0))
  >>> m.apply(p, jnp.zeros((3, 64))).shape
  (3, 10)
  """
  return reg.MODELS.get(name)(ModelSettings(hidden, conv), input_shape,
                              num_classes)


def example_losses(apply, params, x, y):
  """Per-example softmax cross-entropy, ``[B]``, for integer labels ``y[B]``."""
  logits = apply(params, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def evaluate_model(apply, params, x, y, batch: int = 512):
  """Test accuracy and mean loss of ``apply(params, .)`` on ``(x, y)``, in
  batches of ``batch`` (one experiment;
  :class:`fedjax_bsa.run.simulate.Simulation` vmaps it). Rows labelled ``-1``
  are padding (a sweep's test sets padded to one shape) and are left out of
  both."""
  n = x.shape[0]
  pad = (-n) % batch
  xp = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)])
  yp = jnp.concatenate([y, jnp.full((pad,), -1, y.dtype)])
  count = jnp.maximum(jnp.sum(y >= 0), 1)

  def body(carry, i):
    xb = jax.lax.dynamic_slice_in_dim(xp, i * batch, batch)
    yb = jax.lax.dynamic_slice_in_dim(yp, i * batch, batch)
    vb = yb >= 0
    logits = apply(params, xb)
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.maximum(yb, 0))
    correct = (jnp.argmax(logits, -1) == yb) & vb
    return (carry[0] + correct.sum(),
            carry[1] + jnp.where(vb, loss, 0.0).sum()), None

  (correct, loss), _ = jax.lax.scan(
      body, (jnp.int32(0), jnp.float32(0.0)), jnp.arange((n + pad) // batch))
  return correct / count, loss / count
