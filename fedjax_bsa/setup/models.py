"""Flax models, used through a pure ``apply(params, x) -> logits``.

Each model is built by :func:`make_model`, which returns a :class:`Model`
holding ``init(key) -> params`` and ``apply(params, x) -> logits``; the rest
of the simulator sees only these two pure functions and the loss.
"""

from __future__ import annotations

import itertools
from typing import Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import optax

__all__ = ["evaluate_model", "Model", "MLP", "CNN1D", "CNN", "PatchConv",
  "conv_patches",
           "patch_conv", "slice_max_pool", "make_model", "example_losses"]


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


def _same_padding(size: int, k: int, s: int) -> tuple[int, int]:
  """``(low, high)`` padding of a "SAME" window: the output has
  ``ceil(size / s)`` positions and the padding is split with the smaller half
  first, as in ``lax.conv_general_dilated(padding="SAME")``."""
  out = -(-size // s)
  total = max((out - 1) * s + k - size, 0)
  return total // 2, total - total // 2


def _valid_views(x: jax.Array, window: Sequence[int], strides: Sequence[int]):
  """The ``prod(window)`` strided views of ``x[*batch, *spatial, C]`` whose
  elementwise combination is a "VALID" window reduction, row-major order."""
  nd = len(window)
  spatial = x.shape[x.ndim - nd - 1:-1]
  outs = [(n - w) // s + 1 for n, w, s in zip(spatial, window, strides)]
  if min(outs) < 1:
    raise ValueError(f"window={tuple(window)} is larger than the spatial "
                     f"shape {spatial}")
  for offset in itertools.product(*(range(w) for w in window)):
    yield x[(Ellipsis,) + tuple(slice(o, o + s * (n - 1) + 1, s) for o, s, n
                                in zip(offset, strides, outs))
            + (slice(None),)]


def conv_patches(x: jax.Array, kernel_size: Sequence[int],
                 strides: Sequence[int] | None = None, *,
                 method: str = "slices") -> jax.Array:
  """Extracts the "SAME"-padded windows of a channels-last input.

  Args:
    x: ``[*batch, *spatial, C]`` input (``len(spatial) == len(kernel_size)``;
      ``method="lax"`` needs exactly one batch axis).
    kernel_size: window size per spatial axis ``(k_1, ..., k_d)``.
    strides: step per spatial axis (default 1).
    method: ``"slices"`` (concatenate ``prod(k)`` strided views of the padded
      input; features ordered window offset first, row-major, then channel,
      i.e. ``kernel.reshape(-1, C_out)`` order) or ``"lax"``
      (``lax.conv_general_dilated_patches``; features ordered channel first,
      then window offset).

  Returns:
    ``[*batch, *out_spatial, prod(k) * C]`` with ``out_i = ceil(n_i / s_i)``.

  >>> x = jnp.arange(4.0).reshape(1, 4, 1)   # one sequence 0, 1, 2, 3
  >>> conv_patches(x, (3,))[0]                # zero-padded windows
  Array([[0., 0., 1.],
         [0., 1., 2.],
         [1., 2., 3.],
         [2., 3., 0.]], dtype=float32)
  """
  nd = len(kernel_size)
  strides = (1,) * nd if strides is None else tuple(strides)
  if len(strides) != nd or x.ndim < nd + 2:
    raise ValueError(f"conv_patches: kernel_size={tuple(kernel_size)} and "
                     f"strides={strides} need x of rank >= {nd + 2} with "
                     f"{nd} spatial axes; got x.shape={x.shape}")
  spatial = x.shape[x.ndim - nd - 1:-1]
  pads = [_same_padding(n, k, s)
          for n, k, s in zip(spatial, kernel_size, strides)]
  if method == "slices":
    lead = [(0, 0)] * (x.ndim - nd - 1)
    xp = jnp.pad(x, lead + list(pads) + [(0, 0)])
    return jnp.concatenate(list(_valid_views(xp, kernel_size, strides)),
                           axis=-1)
  if method == "lax":
    spec = "N" + "DHW"[3 - nd:] if nd <= 3 else None
    if spec is None or x.ndim != nd + 2:
      raise ValueError(f"conv_patches(method='lax') needs x of rank {nd + 2} "
                       f"and at most 3 spatial axes; got x.shape={x.shape}")
    lhs = spec + "C"
    return lax.conv_general_dilated_patches(
        x, tuple(kernel_size), strides, pads,
        dimension_numbers=(lhs, "OI" + spec[1:], lhs))
  raise ValueError(f"conv_patches: method={method!r} is not allowed: choose "
                   "'slices' or 'lax'")


def patch_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None,
               strides: Sequence[int] | None = None, *,
               method: str = "slices") -> jax.Array:
  """A "SAME" convolution as window extraction plus one matmul.

  Equals ``flax.linen.Conv`` (default "SAME" padding, no dilation, one
  feature group) with the same ``kernel`` and ``bias``. Written as
  ``patches[..., P, k C_in] @ kernel[k C_in, C_out]`` so that under
  ``jax.vmap`` over per-lane kernels it becomes a batched matmul
  (``dot_general`` with a batch axis) instead of a grouped convolution.

  Args:
    x: ``[*batch, *spatial, C_in]`` input, channels last.
    kernel: ``[k_1, ..., k_d, C_in, C_out]`` (flax's ``Conv`` layout).
    bias: optional ``[C_out]``.
    strides: step per spatial axis (default 1).
    method: patch extraction, see :func:`conv_patches`.

  Returns:
    ``[*batch, *out_spatial, C_out]``, ``out_i = ceil(n_i / s_i)``.

  >>> x = jnp.array([[[1.0], [2.0], [3.0], [4.0]]])  # [B=1, L=4, C=1]
  >>> w = jnp.array([1.0, 10.0, 100.0]).reshape(3, 1, 1)
  >>> patch_conv(x, w, jnp.array([0.5]))[..., 0]
  Array([[210.5, 321.5, 432.5,  43.5]], dtype=float32)
  >>> patch_conv(x, w, strides=(2,)).shape
  (1, 2, 1)
  """
  ks, c_in, c_out = kernel.shape[:-2], kernel.shape[-2], kernel.shape[-1]
  if x.shape[-1] != c_in:
    raise ValueError(f"patch_conv: x has {x.shape[-1]} channels but kernel "
                     f"{kernel.shape} expects C_in={c_in}")
  patches = conv_patches(x, ks, strides, method=method)
  if method == "lax":  # features are (channel, offset): permute the kernel
    w = jnp.moveaxis(kernel, -2, 0).reshape(-1, c_out)
  else:
    w = kernel.reshape(-1, c_out)
  y = jnp.dot(patches, w)
  return y if bias is None else y + bias


def slice_max_pool(x: jax.Array, window: Sequence[int],
                   strides: Sequence[int] | None = None) -> jax.Array:
  """"VALID" max pooling as an elementwise max of strided views.

  Equals ``flax.linen.max_pool(x, window, strides)`` in value and in
  gradient, ties included (the first maximal element of a window in
  row-major order takes the whole gradient, as ``lax.reduce_window``'s
  ``select_and_scatter_add`` does). Only slices and selects, so its backward
  pass is pads and selects rather than ``select_and_scatter_add``, which is
  slow on the CPU.

  Args:
    x: ``[*batch, *spatial, C]``.
    window: window size per spatial axis.
    strides: step per spatial axis (default 1, as ``nn.max_pool``).

  Returns:
    ``[*batch, *out_spatial, C]``, ``out_i = (n_i - w_i) // s_i + 1``.

  >>> x = jnp.array([[1., 5., 2., 0.], [3., 4., 7., 7.], [0., 0., 0., 0.]])
  >>> slice_max_pool(x[None, :, :, None], (2, 2), (2, 2))[0, ..., 0]
  Array([[5., 7.]], dtype=float32)
  """
  strides = (1,) * len(window) if strides is None else tuple(strides)
  views = _valid_views(x, window, strides)
  out = next(views)
  for v in views:
    out = jnp.where(out >= v, out, v)  # ties: the earlier view wins
  return out


class PatchConv(nn.Module):
  """``nn.Conv`` ("SAME", no dilation) computed by :func:`patch_conv`.

  Same parameters (``kernel [*kernel_size, C_in, C_out]``, ``bias [C_out]``)
  and initializers as ``nn.Conv``, so a module named like the ``nn.Conv`` it
  replaces initializes to identical values.
  """
  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] | None = None
  method: str = "slices"

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        tuple(self.kernel_size) + (x.shape[-1], self.features),
                        jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,),
                      jnp.float32)
    return patch_conv(x, kernel, bias, self.strides, method=self.method)


CONVS = ("patches", "flax")


def _conv_layer(conv: str, features: int, kernel_size, strides, name: str):
  if conv == "patches":
    return PatchConv(features, tuple(kernel_size), strides, name=name)
  if conv == "flax":
    return nn.Conv(features, tuple(kernel_size), strides=strides, name=name)
  raise ValueError(f"conv={conv!r} is not allowed: choose one of "
                   f"{', '.join(CONVS)}")


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
    x = x.reshape((x.shape[0], -1, 1))
    for i in range(3):
      x = nn.relu(_conv_layer(self.conv, self.channels, (5,), (2,),
                              f"Conv_{i}")(x))
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
    pool = slice_max_pool if self.conv == "patches" else nn.max_pool
    x = nn.relu(_conv_layer(self.conv, self.channels, (3, 3), None,
                            "Conv_0")(x))
    x = pool(x, (2, 2), (2, 2))
    x = nn.relu(_conv_layer(self.conv, 2 * self.channels, (3, 3), None,
                            "Conv_1")(x))
    x = pool(x, (2, 2), (2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(128)(x))
    return nn.Dense(self.num_classes)(x)


def make_model(name: str, input_shape: Sequence[int], num_classes: int, *,
               hidden: int = 256, conv: str = "patches") -> Model:
  """Builds a model by name.

  Args:
    name: ``mlp`` (one hidden layer of ``hidden`` units), ``logreg``,
      ``cnn1d`` or ``cnn``.
    input_shape: shape of one example (without the batch axis).
    num_classes: number of output logits.
    hidden: hidden width of the MLP.
    conv: how the CNNs compute convolutions: ``patches`` (windows @ kernel,
      fast under ``vmap`` over per-lane weights) or ``flax`` (``nn.Conv``);
      same parameters and outputs either way.

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
    module = CNN1D(num_classes, conv=conv)
  elif name == "cnn":
    module = CNN(num_classes, conv=conv)
  else:
    raise ValueError(f"model={name!r} is not allowed: choose one of mlp, "
                     "logreg, cnn1d, cnn")
  if conv not in CONVS:
    raise ValueError(f"conv={conv!r} is not allowed: choose one of "
                     f"{', '.join(CONVS)}")
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
