"""Building blocks of the kernel tests: jobs, algorithms' client sides."""

import functools

import chex
import jax
import jax.numpy as jnp

from fedjax_bsa import kernel as kernel_lib
from fedjax_bsa.data import federated
from fedjax_bsa.setup import models


def loss_of(model):
  return functools.partial(models.example_losses, model.apply)


def make_jobs(cohort, b, s, lr, weights=None, key=0, exp=None):
  cohort = jnp.asarray(cohort, jnp.int32)
  J = cohort.shape[0]
  weights = (jnp.linspace(0.5, 1.5, J) if weights is None
             else jnp.asarray(weights))
  exp = jnp.zeros((J,), jnp.int32) if exp is None else jnp.asarray(
      exp, jnp.int32)
  seeds = federated.shuffle_seeds(jax.random.key(key), cohort)
  return kernel_lib.Jobs(cohort, exp, jnp.asarray(b, jnp.int32),
                         jnp.asarray(s, jnp.int32),
                         jnp.asarray(lr, jnp.float32),
                         weights.astype(jnp.float32), seeds)


def stack(*trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def close(a, b, rtol=2e-4, atol=2e-6):
  """Same tree structure, shapes and values (within tolerances)."""
  chex.assert_trees_all_equal_shapes(a, b)
  chex.assert_trees_all_close(a, b, rtol=rtol, atol=atol)
