"""Convolution and max pooling as slices and one matmul.

:func:`patch_conv` is a "SAME" convolution written as window extraction
(:func:`conv_patches`) plus a matmul, so that under ``jax.vmap`` over
per-lane kernels it is a batched matmul rather than a grouped convolution;
:func:`slice_max_pool` is "VALID" max pooling as an elementwise max of
strided views (its backward pass has no ``select_and_scatter_add``, slow on
the CPU); :class:`PatchConv` is the flax layer of :func:`patch_conv`. The
CNNs of :mod:`fedjax_bsa.setup.models` use them (``conv="patches"``), which
re-exports everything here.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

__all__ = ["conv_patches", "patch_conv", "slice_max_pool", "PatchConv"]


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
