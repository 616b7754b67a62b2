"""The benchmarks' workload mixes, written down once and seeded.

A :class:`Mix` is a federation (host :class:`~fedjax_bsa.data.federated.
FederatedData`), one round's jobs (client, batch ``b_k``, steps ``s_k``,
learning rate, weight) and the model they train.

* **standard** (:func:`standard_mix`): 64 clients, the MLP 64-256-10 on
  scikit-learn's digits (1437 training images) split iid. ``b_k`` is
  log-uniform in [8, 256]; client speeds are lognormal(0, 0.5) and ``b_k s_k``
  is proportional to speed, the fastest client processing 2048 examples::

      s_k = max(1, round(2048 * speed_k / max(speed) / b_k))

  With ``quantize=True`` (the default, as a quantizing controller would plan)
  ``b_k`` is first rounded to a multiple of ``mu = 16`` (in [16, 256]);
  ``quantize=False`` keeps the raw ``b_k`` (same draws).
* **large** (:func:`large_mix`): the same recipe with 1024 clients.
* **uniform** (:func:`uniform_mix`): FedJAX's setting: 64 clients x 256
  digits rows (a random subset each, clients overlap), batch 10, one epoch
  with the remainder dropped (25 steps).
* **cnn1d** (:func:`cnn1d_mix`): the large recipe for the 1-D CNN on
  MNIST-1D (40-sample signals).
* **cnn2d** (:func:`cnn2d_mix`): the standard recipe (64 clients, at most
  512 examples each) for the 2-D CNN on CIFAR-size ``[32, 32, 3]`` images
  (seeded synthetic ones: only shapes matter for timing).
* :func:`random_plan`: a fresh unquantized plan per round (compile test).

All randomness is ``numpy.random.default_rng(seed)``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_bsa import data as data_lib
from fedjax_bsa import kernel as kernel_lib
from fedjax_bsa.data import federated
from fedjax_bsa.setup import models

__all__ = ["MU", "HIDDEN", "Mix", "standard_mix", "large_mix",
           "uniform_mix", "cnn1d_mix", "cnn2d_mix", "custom_mix",
           "random_plan", "speed_plan", "uniform_parts", "make_jobs",
           "model_of"]

MU = 16
HIDDEN = 256
B_RANGE = (8, 256)
MAX_EXAMPLES = 2048
LR = 0.05


@dataclasses.dataclass(frozen=True)
class Mix:
  """One workload: clients' data, one round's jobs and the model."""
  name: str
  description: str
  data: federated.FederatedData   # host arrays
  clients: np.ndarray             # int32 [K], client of each job
  batch_size: np.ndarray          # int32 [K]
  steps: np.ndarray               # int32 [K]
  lr: np.ndarray                  # float32 [K]
  quantized: bool
  model: str = "mlp"
  input_shape: tuple = (64,)
  num_classes: int = 10
  seed: int = 0

  @property
  def num_jobs(self) -> int:
    return int(self.clients.shape[0])

  @property
  def useful_examples(self) -> int:
    return int(np.sum(self.batch_size.astype(np.int64) * self.steps))

  @property
  def s_max(self) -> int:
    return int(self.steps.max())

  @property
  def b_max(self) -> int:
    return int(self.batch_size.max())

  @property
  def weights(self) -> np.ndarray:
    """FedAvg's ``c_k``: examples processed over the total."""
    ex = self.batch_size.astype(np.float64) * self.steps
    return (ex / max(ex.sum(), 1.0)).astype(np.float32)

  def padded_efficiency(self) -> float:
    """``sum(b s) / (K s_max b_max)``: the padded layout's efficiency."""
    return self.useful_examples / float(self.num_jobs * self.s_max *
                                        self.b_max)

  def summary(self) -> dict:
    b, s = self.batch_size, self.steps
    return {"name": self.name, "description": self.description,
            "clients": self.num_jobs, "quantized_to_mu": self.quantized,
            "model": self.model, "input_shape": list(self.input_shape),
            "rows_stored": int(np.asarray(self.data.x).shape[0]),
            "useful_examples": self.useful_examples,
            "b_min": int(b.min()), "b_max": int(b.max()),
            "b_median": float(np.median(b)), "distinct_b": len(set(b)),
            "s_min": int(s.min()), "s_max": int(s.max()),
            "s_median": float(np.median(s)),
            "examples_max": int((b.astype(np.int64) * s).max())}

  def subset(self, k: int) -> "Mix":
    """The first ``k`` jobs (same data)."""
    return dataclasses.replace(
        self, name=f"{self.name}[:{k}]", clients=self.clients[:k],
        batch_size=self.batch_size[:k], steps=self.steps[:k],
        lr=self.lr[:k])

  def with_plan(self, batch_size, steps, lr=None, name=None) -> "Mix":
    """The same clients and data with another plan."""
    lr = self.lr if lr is None else np.asarray(lr, np.float32)
    return dataclasses.replace(
        self, name=name or self.name,
        batch_size=np.asarray(batch_size, np.int32),
        steps=np.asarray(steps, np.int32), lr=lr)


def make_jobs(mix: Mix, round_seed: int | None = None) -> kernel_lib.Jobs:
  """The mix's round as the kernel's :class:`~fedjax_bsa.kernel.Jobs` of one
  experiment (device arrays); shuffles from ``round_seed`` (default: the
  mix's seed)."""
  seed = mix.seed if round_seed is None else round_seed
  clients = jnp.asarray(mix.clients, jnp.int32)
  return kernel_lib.Jobs(
      clients, jnp.zeros_like(clients), jnp.asarray(mix.batch_size),
      jnp.asarray(mix.steps), jnp.asarray(mix.lr), jnp.asarray(mix.weights),
      federated.shuffle_seeds(jax.random.key(seed), clients))


def model_of(mix: Mix) -> models.Model:
  """The mix's model (the MLP's hidden width is :data:`HIDDEN`)."""
  return models.make_model(mix.model, mix.input_shape, mix.num_classes,
                           hidden=HIDDEN)


@functools.lru_cache(maxsize=None)
def _digits():
  ds = data_lib.digits()
  return ds.x_train, ds.y_train


def speed_plan(rng: np.random.Generator, num_clients: int, *,
               quantize: bool, mu: int = MU, b_range=B_RANGE,
               max_examples: int = MAX_EXAMPLES):
  """``(b, s)``: log-uniform ``b_k``, ``b_k s_k`` proportional to speed.

  >>> b, s = speed_plan(np.random.default_rng(0), 4, quantize=True)
  >>> bool((b % MU == 0).all()), bool((s >= 1).all())
  (True, True)
  """
  lo, hi = b_range
  b = np.rint(np.exp(rng.uniform(np.log(lo), np.log(hi), num_clients)))
  speed = rng.lognormal(0.0, 0.5, num_clients)
  if quantize:
    b = np.clip(mu * np.rint(b / mu), mu, mu * (hi // mu))
  b = b.astype(np.int32)
  s = np.maximum(1, np.rint(max_examples * speed / speed.max() / b))
  return b, s.astype(np.int32)


def _speed_mix(name, x, y, num_clients, *, quantize, seed, mu, max_examples,
               what, **model):
  parts = data_lib.iid(len(y), num_clients, seed)
  fd = federated.from_partition(x, y, parts)
  b, s = speed_plan(np.random.default_rng(seed), num_clients,
                    quantize=quantize, mu=mu, max_examples=max_examples)
  rounding = f" rounded to multiples of {mu}" if quantize else ""
  desc = (f"{num_clients} clients, {what} (iid), b_k log-uniform in "
          f"[8, 256]{rounding}, speeds lognormal(0, 0.5), s_k = max(1, "
          f"round({max_examples} * speed_k / max_speed / b_k))")
  return Mix(name, desc, fd, np.arange(num_clients, dtype=np.int32), b, s,
             np.full(num_clients, LR, np.float32), quantize, seed=seed,
             **model)


def standard_mix(num_clients: int = 64, *, quantize: bool = True,
                 seed: int = 0, mu: int = MU,
                 max_examples: int = MAX_EXAMPLES,
                 name: str = "standard") -> Mix:
  """The standard mix (module docstring)."""
  x, y = _digits()
  return _speed_mix(name, x, y, num_clients, quantize=quantize, seed=seed,
                    mu=mu, max_examples=max_examples,
                    what=f"MLP 64-{HIDDEN}-10 on digits")


def large_mix(*, quantize: bool = True, seed: int = 0) -> Mix:
  """The standard recipe with 1024 clients."""
  return standard_mix(1024, quantize=quantize, seed=seed, name="large")


def uniform_parts(num_clients: int = 64, rows: int = 256, seed: int = 0):
  """The uniform mix's clients: ``rows`` distinct digits rows each."""
  rng = np.random.default_rng(seed)
  n = len(_digits()[1])
  return [np.sort(rng.choice(n, rows, replace=False))
          for _ in range(num_clients)]


def uniform_mix(num_clients: int = 64, *, batch: int = 10, rows: int = 256,
                seed: int = 0) -> Mix:
  """Every client: ``rows`` rows, batch ``batch``, one epoch (the last,
  partial batch dropped: ``rows // batch`` steps)."""
  x, y = _digits()
  fd = federated.from_partition(x, y, uniform_parts(num_clients, rows,
                                                    seed))
  steps = rows // batch
  desc = (f"{num_clients} clients x {rows} digits rows (random subsets), "
          f"batch {batch}, {steps} steps = one epoch, remainder dropped")
  return Mix("uniform", desc, fd, np.arange(num_clients, dtype=np.int32),
             np.full(num_clients, batch, np.int32),
             np.full(num_clients, steps, np.int32),
             np.full(num_clients, LR, np.float32), False, seed=seed)


def _mnist1d_like(n: int, seed: int):
  """Class-dependent smooth 1-D signals of length 40 (only shapes matter)."""
  rng = np.random.default_rng(seed)
  t = np.linspace(0.0, 1.0, 40)
  y = rng.integers(0, 10, n).astype(np.int32)
  shift = rng.uniform(-0.1, 0.1, (n, 1))
  x = np.sin(2 * np.pi * (y[:, None] + 1) * (t[None, :] + shift) / 4)
  return (x + 0.3 * rng.standard_normal((n, 40))).astype(np.float32), y


def cnn1d_mix(num_clients: int = 1024, *, seed: int = 0,
              max_examples: int = MAX_EXAMPLES) -> Mix:
  """The large recipe for the 1-D CNN on MNIST-1D (4000 examples)."""
  try:
    ds = data_lib.mnist1d(4000, seed=seed)
    x, y, source = ds.x_train, ds.y_train, "MNIST-1D"
  except ImportError:  # no mnist1d package (e.g. a bare GPU image)
    x, y = _mnist1d_like(3200, seed)
    source = "MNIST-1D-like synthetic [40] signals (mnist1d not installed)"
  return _speed_mix("cnn1d", x, y, num_clients, quantize=True, seed=seed,
                    mu=MU, max_examples=max_examples,
                    what=f"cnn1d on {source}", model="cnn1d",
                    input_shape=(40,))


def _cifar_like(n: int, seed: int):
  """Seeded ``[n, 32, 32, 3]`` images with class-dependent colour means."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 10, n).astype(np.int32)
  mean = rng.uniform(-0.5, 0.5, (10, 1, 1, 3)).astype(np.float32)
  x = mean[y] + rng.standard_normal((n, 32, 32, 3), np.float32)
  return x, y


def cnn2d_mix(num_clients: int = 64, *, rows: int = 50, seed: int = 0,
              max_examples: int = 512) -> Mix:
  """The standard recipe for the 2-D CNN on CIFAR-size images."""
  x, y = _cifar_like(num_clients * rows, seed)
  return _speed_mix("cnn2d", x, y, num_clients, quantize=True, seed=seed,
                    mu=MU, max_examples=max_examples,
                    what="cnn on CIFAR-size [32, 32, 3] synthetic images",
                    model="cnn", input_shape=(32, 32, 3))


def custom_mix(batch_size, steps, *, rows: int = 8, lr: float = LR,
               name: str = "custom") -> Mix:
  """A hand-made plan on clients of ``rows`` digits rows each (tests).

  >>> custom_mix([16, 32, 8], [2, 1, 3]).useful_examples
  88
  """
  b = np.asarray(batch_size, np.int32)
  s = np.asarray(steps, np.int32)
  x, y = _digits()
  k = len(b)
  parts = [np.arange(i * rows, (i + 1) * rows) for i in range(k)]
  fd = federated.from_partition(x, y, parts)
  return Mix(name, "hand-made plan", fd, np.arange(k, dtype=np.int32), b, s,
             np.full(k, lr, np.float32), False)


def random_plan(rng: np.random.Generator, num_clients: int):
  """A fresh ``(b, s, lr)``: ``b_k`` log-uniform in [1, 256], ``s_k`` in
  [0, 20], ``lr`` log-uniform in [0.01, 0.3] (the compile test's plans).

  >>> b, s, lr = random_plan(np.random.default_rng(0), 3)
  >>> b.dtype, s.dtype, lr.dtype
  (dtype('int32'), dtype('int32'), dtype('float32'))
  """
  b = np.rint(np.exp(rng.uniform(0.0, np.log(256), num_clients)))
  s = rng.integers(0, 21, num_clients)
  lr = np.exp(rng.uniform(np.log(0.01), np.log(0.3), num_clients))
  return b.astype(np.int32), s.astype(np.int32), lr.astype(np.float32)
