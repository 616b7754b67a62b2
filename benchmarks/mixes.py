"""The round-kernel benchmark's workload mixes, written down once and seeded.

Every mix is a cohort of clients, their on-device data and one round's plan
(per-client batch size ``b_k``, local steps ``s_k``, learning rate).

* **standard** (:func:`standard_mix`): 64 cohort clients, the MLP 64-256-10
  on scikit-learn's digits (1437 training images) split iid into the clients
  (:func:`fedjax_bsa.data.iid`, seed 0, about 22 images each; a client whose
  batch outgrows its data walks through it again, which changes nothing about
  the cost). ``b_k`` is log-uniform in [8, 256]; client speeds are
  lognormal(0, 0.5); ``b_k * s_k`` is proportional to speed, the fastest
  client processing 2048 examples per round::

      s_k = max(1, round(2048 * speed_k / max(speed) / b_k))

  With ``quantize=True`` (the default: what "this kernel" is fed, as a
  quantizing batch-size controller would) ``b_k`` is first rounded to the
  nearest multiple of the microbatch ``mu = 16`` (at least 16, at most 256)
  and ``s_k`` is computed from the rounded ``b_k``. ``quantize=False`` keeps
  the raw integer ``b_k`` (same seed, same draws) to report what the layout
  loses without quantization.
* **large** (:func:`large_mix`): the same recipe with 1024 cohort clients
  (digits split iid into 1024 clients: 1-2 images each).
* **uniform** (:func:`uniform_mix`): FedJAX's EMNIST-style setting: 64
  clients, every client holds 160 images (a random 160-subset of the digits
  training set per client, drawn without replacement within a client, so
  clients overlap), batch 10 and 16 steps: exactly one epoch each.
* :func:`random_plan`: a fresh random plan per round for the compile test
  (``b_k`` log-uniform in [1, 256], unquantized; ``s_k`` in [0, 20]; ``lr``
  log-uniform in [0.01, 0.3]).

All randomness is ``numpy.random.default_rng(seed)``; the same seed gives the
same mix.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from fedjax_bsa import federated
from fedjax_bsa import data as data_lib

__all__ = ["MU", "Mix", "standard_mix", "large_mix", "uniform_mix", "cnn_mix",
           "random_plan", "custom_mix", "mlp_flops_per_example",
           "matmul_params"]

MU = 16            # the kernel's microbatch for the standard and large mixes
B_RANGE = (8, 256)
MAX_EXAMPLES = 2048
LR = 0.05
HIDDEN = 256


@dataclasses.dataclass(frozen=True)
class Mix:
  """One benchmark workload: clients' data and one round's plan (numpy)."""
  name: str
  description: str
  data: federated.FederatedData   # numpy arrays, all clients
  cohort: np.ndarray              # int32 [K]
  batch_size: np.ndarray          # int32 [K]
  steps: np.ndarray               # int32 [K]
  lr: np.ndarray                  # float32 [K]
  weights: np.ndarray             # float32 [K], sum to 1
  quantized: bool
  model: str = "mlp"
  input_shape: tuple = (64,)
  num_classes: int = 10

  @property
  def num_clients(self) -> int:
    return int(self.cohort.shape[0])

  @property
  def useful_examples(self) -> int:
    return int(np.sum(self.batch_size.astype(np.int64) * self.steps))

  @property
  def s_max(self) -> int:
    return int(self.steps.max())

  @property
  def b_max(self) -> int:
    return int(self.batch_size.max())

  def padded_efficiency(self) -> float:
    """useful / (K * s_max * b_max): the padded layout's efficiency."""
    return self.useful_examples / float(
        self.num_clients * self.s_max * self.b_max)

  def summary(self) -> dict:
    b, s = self.batch_size, self.steps
    return {
        "name": self.name, "description": self.description,
        "clients": self.num_clients, "quantized_to_mu": self.quantized,
        "model": self.model, "input_shape": list(self.input_shape),
        "useful_examples": self.useful_examples,
        "b_min": int(b.min()), "b_max": int(b.max()),
        "b_median": float(np.median(b)), "distinct_b": int(len(set(b))),
        "s_min": int(s.min()), "s_max": int(s.max()),
        "s_median": float(np.median(s)),
        "examples_max": int((b * s).max()),
    }

  def subset(self, k: int) -> "Mix":
    """The first ``k`` cohort clients (same data arrays)."""
    w = self.weights[:k]
    return dataclasses.replace(
        self, name=f"{self.name}[:{k}]", cohort=self.cohort[:k],
        batch_size=self.batch_size[:k], steps=self.steps[:k],
        lr=self.lr[:k], weights=(w / w.sum()).astype(np.float32))


@functools.lru_cache(maxsize=None)
def _digits():
  ds = data_lib.digits()
  return ds.x_train, ds.y_train


def _weights(b, s):
  ex = (b.astype(np.float64) * s)
  return (ex / max(ex.sum(), 1.0)).astype(np.float32)


def speed_plan(rng: np.random.Generator, num_clients: int, *,
               quantize: bool, mu: int = MU, b_range=B_RANGE,
               max_examples: int = MAX_EXAMPLES):
  """``(b, s)``: log-uniform ``b_k``, ``b_k * s_k`` proportional to speed."""
  lo, hi = b_range
  b = np.rint(np.exp(rng.uniform(np.log(lo), np.log(hi), num_clients)))
  speed = rng.lognormal(0.0, 0.5, num_clients)
  if quantize:
    b = np.clip(mu * np.rint(b / mu), mu, mu * (hi // mu))
  b = b.astype(np.int32)
  s = np.maximum(1, np.rint(max_examples * speed / speed.max() / b))
  return b, s.astype(np.int32)


def standard_mix(num_clients: int = 64, *, quantize: bool = True,
                 seed: int = 0, mu: int = MU, max_examples: int = MAX_EXAMPLES,
                 name: str = "standard") -> Mix:
  """The standard mix (module docstring)."""
  x, y = _digits()
  parts = data_lib.iid(len(y), num_clients, seed)
  fd = federated.from_partition(x, y, parts)
  b, s = speed_plan(np.random.default_rng(seed), num_clients,
                    quantize=quantize, mu=mu, max_examples=max_examples)
  rounding = f" rounded to multiples of {mu}" if quantize else ""
  desc = (f"{num_clients} clients, MLP 64-{HIDDEN}-10 on digits (iid), b_k "
          f"log-uniform in [8, 256]{rounding}, speeds lognormal(0, 0.5), "
          f"s_k = max(1, round({max_examples} * speed_k / max_speed / b_k))")
  return Mix(name, desc, fd, np.arange(num_clients, dtype=np.int32), b, s,
             np.full(num_clients, LR, np.float32), _weights(b, s), quantize)


def cnn_mix(num_clients: int = 1024, *, seed: int = 0,
            max_examples: int = MAX_EXAMPLES) -> Mix:
  """The large recipe for the 1-D CNN on MNIST-1D (4000 examples, [40])."""
  try:
    ds = data_lib.mnist1d(4000, seed=seed)
    x, y, source = ds.x_train, ds.y_train, "MNIST-1D"
  except ImportError:  # no mnist1d package (e.g. a bare GPU image)
    x, y = _mnist1d_like(3200, seed)
    source = "MNIST-1D-like synthetic [40] signals (mnist1d not installed)"
  parts = data_lib.iid(len(y), num_clients, seed)
  fd = federated.from_partition(x, y, parts)
  b, s = speed_plan(np.random.default_rng(seed), num_clients, quantize=True,
                    max_examples=max_examples)
  desc = (f"{num_clients} clients, cnn1d on {source} (iid), the standard "
          f"plan recipe (b_k rounded to multiples of {MU})")
  return Mix("cnn", desc, fd, np.arange(num_clients, dtype=np.int32), b, s,
             np.full(num_clients, LR, np.float32), _weights(b, s), True,
             model="cnn1d", input_shape=(40,), num_classes=10)


def large_mix(*, quantize: bool = True, seed: int = 0) -> Mix:
  """The standard recipe with 1024 clients."""
  return standard_mix(1024, quantize=quantize, seed=seed, name="large")


def uniform_mix(num_clients: int = 64, *, batch: int = 10,
                examples_per_client: int = 160, epochs: int = 1,
                seed: int = 0) -> Mix:
  """Every client: ``examples_per_client`` images, batch 10, one epoch."""
  x, y = _digits()
  parts = uniform_parts(num_clients, examples_per_client, seed)
  fd = federated.from_partition(x, y, parts)
  steps = epochs * examples_per_client // batch
  b = np.full(num_clients, batch, np.int32)
  s = np.full(num_clients, steps, np.int32)
  desc = (f"{num_clients} clients x {examples_per_client} digits images "
          f"(random subsets), batch {batch}, {steps} steps = {epochs} epoch")
  return Mix("uniform", desc, fd, np.arange(num_clients, dtype=np.int32), b,
             s, np.full(num_clients, LR, np.float32), _weights(b, s), False)


def uniform_parts(num_clients: int = 64, examples_per_client: int = 160,
                  seed: int = 0):
  """The uniform mix's client index sets (shared with the FedJAX runner)."""
  rng = np.random.default_rng(seed)
  n = len(_digits()[1])
  return [np.sort(rng.choice(n, examples_per_client, replace=False))
          for _ in range(num_clients)]


def custom_mix(batch_size, steps, *, examples_per_client: int = 8,
               lr: float = LR, name: str = "custom") -> Mix:
  """A hand-made plan on tiny digits clients (tests)."""
  b = np.asarray(batch_size, np.int32)
  s = np.asarray(steps, np.int32)
  x, y = _digits()
  k = len(b)
  parts = [np.arange(i * examples_per_client, (i + 1) * examples_per_client)
           for i in range(k)]
  fd = federated.from_partition(x, y, parts)
  return Mix(name, "hand-made plan", fd, np.arange(k, dtype=np.int32), b, s,
             np.full(k, lr, np.float32), _weights(b, s), False)


def _mnist1d_like(n: int, seed: int):
  """Class-dependent smooth 1-D signals of length 40 (only shapes matter)."""
  rng = np.random.default_rng(seed)
  t = np.linspace(0.0, 1.0, 40)
  y = rng.integers(0, 10, n).astype(np.int32)
  shift = rng.uniform(-0.1, 0.1, (n, 1))
  x = np.sin(2 * np.pi * (y[:, None] + 1) * (t[None, :] + shift) / 4)
  x = x + 0.3 * rng.standard_normal((n, 40))
  return x.astype(np.float32), y


def random_plan(rng: np.random.Generator, num_clients: int):
  """A fresh random (b, s, lr) per call: the compile test's changing plan."""
  b = np.rint(np.exp(rng.uniform(0.0, np.log(256), num_clients)))
  s = rng.integers(0, 21, num_clients)
  lr = np.exp(rng.uniform(np.log(0.01), np.log(0.3), num_clients))
  return (b.astype(np.int32), s.astype(np.int32), lr.astype(np.float32))


def matmul_params(input_dim: int = 64, hidden: int = HIDDEN,
                  classes: int = 10) -> int:
  """Weights that take part in matmuls in the MLP (biases excluded)."""
  return input_dim * hidden + hidden * classes


def mlp_flops_per_example(input_dim: int = 64, hidden: int = HIDDEN,
                          classes: int = 10) -> int:
  """Forward + backward matmul FLOPs per example: 6 * matmul params.

  Forward: 2 FLOPs per weight (multiply-add); backward: 4 (grad w.r.t. the
  activations and w.r.t. the weights). The first layer's input gradient is
  not needed, so this slightly overcounts (by 2 * 64 * 256 per example).
  """
  return 6 * matmul_params(input_dim, hidden, classes)
