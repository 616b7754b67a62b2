"""Tests for fedjax_bsa.setup.models: patch convolutions and slice max-pooling
against flax's ``nn.Conv`` / ``nn.max_pool``, whole models against their
flax-conv variants, per-lane ``vmap`` against a loop over lanes, and the
models registered once, looked up by name (``make_model``, the experiment,
``model=auto``), a user's too."""

import doctest

import flax.linen as nn
from hypothesis import given, settings, strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_bsa.core import registry
from fedjax_bsa.core.config import Config
from fedjax_bsa.data import datasets
from fedjax_bsa.setup import experiment
from fedjax_bsa.setup import models
from fedjax_bsa.setup import patch_layers


def _close(a, b, rtol=1e-5):
  """Relative closeness, with an absolute floor scaled to the reference."""
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape
  np.testing.assert_allclose(a, b, rtol=rtol,
                             atol=rtol * max(1.0, float(np.abs(b).max())))


def _trees_close(a, b, rtol=1e-5):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: _close(x, y, rtol), a, b)


def _flax_conv(x, kernel, bias, strides):
  conv = nn.Conv(kernel.shape[-1], kernel.shape[:-2], strides=strides)
  return conv.apply({"params": {"kernel": kernel, "bias": bias}}, x)


def _rand(seed, *shape):
  """Standard normal test data (numpy: no compile per shape)."""
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.standard_normal(shape, dtype=np.float32))


# ------------------------------------------------------------ patch_conv


CASES_1D = [  # (length, k, stride, c_in, c_out)
    (40, 5, 2, 1, 32), (20, 5, 2, 32, 32), (7, 3, 1, 3, 4), (8, 3, 2, 2, 5),
    (9, 4, 2, 1, 1), (6, 2, 1, 5, 3), (11, 4, 3, 2, 3), (4, 5, 2, 3, 1)]
CASES_2D = [  # (h, w, (kh, kw), stride, c_in, c_out)
    (8, 8, (3, 3), 1, 1, 32), (4, 4, (3, 3), 1, 32, 64),
    (7, 9, (3, 3), 2, 3, 4), (6, 5, (2, 3), 1, 2, 6), (5, 6, (4, 2), 2, 1, 3),
    (3, 4, (5, 5), 1, 2, 2)]


def _check_against_flax(x, w, b, strides):
  """Both patch extractions against nn.Conv, in one compile."""
  got_s, got_l, want = jax.jit(lambda x, w, b: (
      models.patch_conv(x, w, b, strides, method="slices"),
      models.patch_conv(x, w, b, strides, method="lax"),
      _flax_conv(x, w, b, strides)))(x, w, b)
  out = tuple(-(-n // s) for n, s in zip(x.shape[1:-1], strides))
  assert want.shape == x.shape[:1] + out + w.shape[-1:]
  _close(got_s, want)
  _close(got_l, want)


@pytest.mark.parametrize("case", CASES_1D)
def test_patch_conv_1d_equals_flax_conv(case):
  n, k, s, c_in, c_out = case
  _check_against_flax(_rand(0, 3, n, c_in), _rand(1, k, c_in, c_out),
                      _rand(2, c_out), (s,))


@pytest.mark.parametrize("case", CASES_2D)
def test_patch_conv_2d_equals_flax_conv(case):
  h, wd, ks, s, c_in, c_out = case
  _check_against_flax(_rand(3, 2, h, wd, c_in), _rand(4, *ks, c_in, c_out),
                      _rand(5, c_out), (s, s))


@settings(max_examples=8, deadline=None)
@given(nd=st.integers(1, 2), n=st.integers(1, 9), k=st.integers(1, 5),
       s=st.integers(1, 3), c_in=st.integers(1, 6), c_out=st.integers(1, 6),
       seed=st.integers(0, 2**16))
def test_patch_conv_equals_flax_conv_random_shapes(nd, n, k, s, c_in, c_out,
                                                   seed):
  spatial = (n,) if nd == 1 else (n, n + 1)
  ks = (k,) * nd
  x = _rand(seed, 2, *spatial, c_in)
  w, b = _rand(seed + 1, *ks, c_in, c_out), _rand(seed + 2, c_out)
  both = jax.jit(lambda x, w, b: (models.patch_conv(x, w, b, (s,) * nd),
                                  _flax_conv(x, w, b, (s,) * nd)))
  _close(*both(x, w, b))


def test_patch_conv_hand_computed_2d():
  # 3x3 input, 2x2 kernel [[1, 2], [3, 4]], SAME pads (0, 1) on each axis.
  x = jnp.arange(1.0, 10.0).reshape(1, 3, 3, 1)
  w = jnp.array([[1.0, 2.0], [3.0, 4.0]]).reshape(2, 2, 1, 1)
  want = np.array([[1 + 4 + 12 + 20, 2 + 6 + 15 + 24, 3 + 18],
                   [4 + 10 + 21 + 32, 5 + 12 + 24 + 36, 6 + 27],
                   [7 + 16, 8 + 18, 9]], np.float32)
  np.testing.assert_array_equal(models.patch_conv(x, w)[0, ..., 0], want)


def test_patch_conv_gradients_equal_flax_conv():
  x = _rand(6, 4, 9, 7, 3)
  w, b = _rand(7, 3, 3, 3, 5), _rand(8, 5)
  target = _rand(9, 4, 5, 4, 5)

  def loss(conv):
    return lambda x, w, b: jnp.sum(jnp.tanh(conv(x, w, b)) * target)

  ours = jax.jit(jax.grad(
      loss(lambda x, w, b: models.patch_conv(x, w, b, (2, 2))),
      argnums=(0, 1, 2)))(x, w, b)
  ref = jax.jit(jax.grad(
      loss(lambda x, w, b: _flax_conv(x, w, b, (2, 2))),
      argnums=(0, 1, 2)))(x, w, b)
  _trees_close(ours, ref)


def test_patch_conv_leading_batch_axes():
  x = _rand(10, 2, 3, 11, 4)
  w, b = _rand(11, 3, 4, 2), _rand(12, 2)
  got = models.patch_conv(x, w, b, (2,))
  want = _flax_conv(x.reshape(6, 11, 4), w, b, (2,)).reshape(2, 3, 6, 2)
  _close(got, want)


def test_patch_conv_errors_name_the_setting():
  x = jnp.zeros((1, 5, 2))
  with pytest.raises(ValueError, match="method='nope'"):
    models.patch_conv(x, jnp.zeros((3, 2, 1)), method="nope")
  with pytest.raises(ValueError, match="C_in=3"):
    models.patch_conv(x, jnp.zeros((3, 3, 1)))
  with pytest.raises(ValueError, match="rank >= 4"):
    models.patch_conv(x, jnp.zeros((3, 3, 2, 1)))


# -------------------------------------------------------- slice_max_pool


@pytest.mark.parametrize("shape,window,strides", [
    ((2, 8, 8, 3), (2, 2), (2, 2)), ((2, 7, 5, 2), (2, 2), (2, 2)),
    ((1, 6, 9, 1), (3, 2), (1, 2)), ((3, 9, 4), (3,), (2,)),
    ((2, 5, 5, 2), (2, 2), None)])
def test_slice_max_pool_value_and_grad_equal_flax(shape, window, strides):
  # Integer values in 0..2 make ties common: the gradient must go where
  # nn.max_pool sends it (the first maximum of each window).
  x = jax.random.randint(jax.random.key(13), shape, 0, 3).astype(jnp.float32)
  ref_fn = lambda x: nn.max_pool(x, window, strides)
  ours_fn = lambda x: models.slice_max_pool(x, window, strides)
  ref = ref_fn(x)
  cot = _rand(14, *ref.shape)

  @jax.jit
  def value_and_grads(x):
    vjp = lambda f: jax.vjp(f, x)[1](cot)[0]
    return ours_fn(x), vjp(ours_fn), vjp(ref_fn)

  out, g_ours, g_ref = value_and_grads(x)
  np.testing.assert_array_equal(out, ref)
  np.testing.assert_array_equal(g_ours, g_ref)
  if strides == window:  # disjoint windows: exactly one winner in each
    assert np.count_nonzero(g_ref) == ref.size


def test_slice_max_pool_window_too_large():
  with pytest.raises(ValueError, match=r"window=\(3, 3\)"):
    models.slice_max_pool(jnp.zeros((1, 2, 2, 1)), (3, 3))


# ----------------------------------------------------------------- models


CNN1D_TREE = {"Conv_0": {"bias": (32,), "kernel": (5, 1, 32)},
              "Conv_1": {"bias": (32,), "kernel": (5, 32, 32)},
              "Conv_2": {"bias": (32,), "kernel": (5, 32, 32)},
              "Dense_0": {"bias": (10,), "kernel": (160, 10)}}
CNN_TREE = {"Conv_0": {"bias": (32,), "kernel": (3, 3, 1, 32)},
            "Conv_1": {"bias": (64,), "kernel": (3, 3, 32, 64)},
            "Dense_0": {"bias": (128,), "kernel": (256, 128)},
            "Dense_1": {"bias": (10,), "kernel": (128, 10)}}
MODELS = [("cnn1d", (40,), CNN1D_TREE), ("cnn", (8, 8), CNN_TREE),
          ("cnn", (9, 11, 3), None)]


def _shapes(tree):
  return jax.tree.map(lambda a: tuple(a.shape), tree)


@pytest.mark.parametrize("name,shape,tree", MODELS)
def test_model_params_outputs_and_grads_equal_flax_variant(name, shape, tree):
  ours = models.make_model(name, shape, 10)
  ref = models.make_model(name, shape, 10, conv="flax")
  p = jax.jit(ours.init)(jax.random.key(0))
  p_ref = jax.jit(ref.init)(jax.random.key(0))
  # Same names, shapes and initial values as the nn.Conv model.
  if tree is not None:
    assert _shapes(p) == tree
  jax.tree.map(np.testing.assert_array_equal, p, p_ref)
  # Perturb the (zero-initialized) biases so they matter.
  leaves, treedef = jax.tree.flatten(p)
  p = treedef.unflatten([a + 0.1 * _rand(30 + i, *a.shape)
                         for i, a in enumerate(leaves)])
  x = _rand(20, 6, *shape)
  y = jnp.arange(6) % 10

  def loss(m):
    return lambda p: jnp.mean(models.example_losses(m.apply, p, x, y))

  @jax.jit
  def both(p):
    return (ours.apply(p, x), ref.apply(p, x),
            jax.value_and_grad(loss(ours))(p), jax.value_and_grad(loss(ref))(p))

  out, out_ref, (l_ours, g_ours), (l_ref, g_ref) = both(p)
  _close(out, out_ref)
  _close(l_ours, l_ref)
  _trees_close(g_ours, g_ref, rtol=1e-4)


def test_cnn_default_is_patches_and_unknown_conv_is_rejected():
  m = models.CNN1D(10)
  assert m.conv == "patches" and models.CNN(10).conv == "patches"
  with pytest.raises(ValueError, match="conv='grouped'"):
    models.make_model("cnn1d", (40,), 10, conv="grouped")
  with pytest.raises(ValueError, match="conv='grouped'"):
    models.CNN1D(10, conv="grouped").init(jax.random.key(0),
                                          jnp.zeros((1, 40)))


@pytest.mark.parametrize("name,shape", [("cnn1d", (40,)), ("cnn", (8, 8))])
def test_vmap_over_lanes_equals_loop_over_lanes(name, shape):
  """Per-lane params and data under vmap equal a Python loop over lanes of
  the flax-conv model, and the vmapped patch model runs no convolution."""
  lanes, mb = 4, 5
  ours = models.make_model(name, shape, 10)
  ref = models.make_model(name, shape, 10, conv="flax")
  keys = jax.random.split(jax.random.key(1), lanes)
  p = jax.jit(jax.vmap(ours.init))(keys)  # [L, ...] per-lane params
  x = _rand(21, lanes, mb, *shape)
  y = jax.random.randint(jax.random.key(22), (lanes, mb), 0, 10)

  def vg(m):
    return jax.value_and_grad(
        lambda p, x, y: jnp.sum(models.example_losses(m.apply, p, x, y)))

  lowered = jax.jit(jax.vmap(vg(ours))).lower(p, x, y)
  got_l, got_g = lowered.compile()(p, x, y)
  one_lane = jax.jit(vg(ref))
  for i in range(lanes):
    p_i = jax.tree.map(lambda a: a[i], p)
    want_l, want_g = one_lane(p_i, x[i], y[i])
    _close(got_l[i], want_l)
    _trees_close(jax.tree.map(lambda a: a[i], got_g), want_g, rtol=1e-4)
  # Under vmap the convolutions are batched matmuls, not grouped convs.
  hlo = lowered.as_text()
  assert "convolution" not in hlo and "dot_general" in hlo
  jaxpr = str(jax.make_jaxpr(jax.vmap(vg(ours)))(p, x, y))
  assert "conv_general_dilated" not in jaxpr
  assert "select_and_scatter" not in jaxpr and "reduce_window" not in jaxpr


# ---------------------------------------------------------- registration

BUILT_IN = ("mlp", "logreg", "cnn1d", "cnn")


def test_models_registered_once_where_defined():
  assert registry.MODELS.names()[:4] == BUILT_IN
  for name in BUILT_IN:
    assert registry.MODELS.get(name) is getattr(models, name)


def test_make_model_looks_the_name_up():
  with pytest.raises(ValueError, match="model='nope' is not allowed: choose "
                     "one of mlp, logreg, cnn1d, cnn"):
    models.make_model("nope", (64,), 10)
  with pytest.raises(ValueError, match="conv='grouped' is not allowed: "
                     "choose one of patches, flax"):
    models.make_model("mlp", (64,), 10, conv="grouped")
  m = models.make_model("mlp", (64,), 10, hidden=8)
  shapes = jax.tree.map(jnp.shape, m.init(jax.random.key(0)))
  assert shapes["Dense_0"]["kernel"] == (64, 8)
  assert (m.name, m.input_shape, m.num_classes) == ("mlp", (64,), 10)
  m = models.make_model("logreg", (64,), 10)
  assert list(m.init(jax.random.key(0))) == ["Dense_0"]


def test_experiment_model_is_make_models():
  cfg = Config(hidden=16)
  ds = datasets.digits()
  got = experiment.make_model(cfg, ds)
  want = models.make_model("mlp", ds.x_train.shape[1:], ds.num_classes,
                           hidden=16)
  key = jax.random.key(3)
  jax.tree.map(np.testing.assert_array_equal, got.init(key), want.init(key))
  assert got.name == "mlp"


def test_auto_model_asks_the_dataset():
  digits = datasets.digits()
  images = digits._replace(x_train=digits.x_train.reshape(-1, 8, 8))
  pick = lambda ds, **kw: experiment.model_name(Config(**kw), ds)
  assert pick(digits) == "mlp" and pick(images) == "cnn"
  assert pick(digits, dataset="mnist1d") == "cnn1d"
  assert pick(digits, dataset="synthetic") == "logreg"
  assert pick(digits, model="logreg") == "logreg"
  registry.DATASETS.register("digits_logreg", lambda cfg: digits,
                             auto_model="logreg")
  assert pick(digits, dataset="digits_logreg") == "logreg"


def test_a_users_model_is_built_by_name():
  @registry.MODELS.register("linear_no_bias")
  def linear_no_bias(cfg, input_shape, num_classes):
    del cfg
    dim = int(np.prod(input_shape))
    return models.Model(lambda key: {"w": jnp.zeros((dim, num_classes))},
                        lambda p, x: x.reshape(x.shape[0], -1) @ p["w"],
                        tuple(input_shape), num_classes, "linear_no_bias")

  m = models.make_model("linear_no_bias", (8, 8), 10)
  assert m.apply(m.init(None), jnp.ones((2, 8, 8))).shape == (2, 10)
  cfg = Config(model="linear_no_bias")
  ds = datasets.digits()
  assert experiment.make_model(cfg, ds).input_shape == ds.x_train.shape[1:]


def test_docstring_examples():
  for module in (models, patch_layers):
    failures, tried = doctest.testmod(
        module, extraglobs={"jax": jax, "jnp": jnp}, verbose=False)
    assert tried >= 4 and failures == 0, module.__name__
