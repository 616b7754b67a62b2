"""From a :class:`~fedjax_bsa.core.config.Config` to the host-side pieces of one
experiment: dataset, partition, resources, model, algorithm. Run once,
before the compiled loop.

The built-in datasets and partitions register themselves here
(:mod:`fedjax_bsa.core.registry`), each once, by a factory of the config
(and the dataset) that calls its loader or partitioner in
:mod:`fedjax_bsa.data`. The models register themselves in
:mod:`fedjax_bsa.setup.models`, the resource profiles in
:mod:`fedjax_bsa.setup.resources`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import numpy as np

from fedjax_bsa import algorithms
from fedjax_bsa.core import registry as reg
from fedjax_bsa.core.config import Config, ConfigError
from fedjax_bsa.data import datasets
from fedjax_bsa.data import loaders
from fedjax_bsa.data import partition as partition_lib
from fedjax_bsa.plans import clock
from fedjax_bsa.setup import models
from fedjax_bsa.setup import resources as resources_lib

__all__ = ["Experiment", "build", "load_dataset", "make_parts",
           "make_resources", "make_model", "model_name"]


class Experiment(NamedTuple):
  """The host-side pieces of one experiment, built from a config."""
  cfg: Config
  dataset: datasets.Dataset
  parts: list                                # index arrays, one per client
  resources: resources_lib.ClientResources   # numpy, [N]
  model: models.Model
  algorithm: algorithms.Algorithm
  model_bytes: int

  @property
  def num_clients(self) -> int:
    return len(self.parts)


def _as_user_error(what: str, build, *args):
  """Calls a host-side builder; its ``ValueError`` (a bad setting or file,
  never a bug in compiled code) becomes a :class:`ConfigError`."""
  try:
    return build(*args)
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError(f"{what}: {e}") from None


# ---------------------------------------------------------------- datasets


@reg.DATASETS.register("digits")
def _digits(cfg):
  """scikit-learn's bundled 8x8 digits, fixed 80/20 split."""
  del cfg
  return datasets.digits()


@reg.DATASETS.register("mnist1d", seeded=True, auto_model="cnn1d")
def _mnist1d(cfg):
  """MNIST-1D from the ``mnist1d`` package's offline generator."""
  return _mnist1d_cached(cfg.num_examples, cfg.seed)


@functools.lru_cache(maxsize=8)
def _mnist1d_cached(num_examples: int, seed: int):
  # generating 40,000 examples takes ~15 s; sweeps and studies rebuild the
  # same ones (the arrays are never written to)
  return datasets.mnist1d(num_examples=num_examples, seed=seed)


@reg.DATASETS.register("synthetic", seeded=True, auto_model="logreg")
def _synthetic(cfg):
  """Synthetic(alpha, beta) of Li et al. (FedProx), natural clients."""
  return datasets.synthetic(alpha=cfg.synthetic_alpha,
                            beta=cfg.synthetic_beta,
                            num_clients=cfg.num_clients, seed=cfg.seed)


@reg.DATASETS.register("leaf", reads_file=True)
def _leaf(cfg):
  """LEAF JSON files (FEMNIST, Shakespeare, ...) in ``data_path``."""
  return loaders.load_leaf(cfg.data_path)


@reg.DATASETS.register("cifar10", reads_file=True)
def _cifar10(cfg):
  """CIFAR-10's pickled batches in the folder ``data_path``."""
  return loaders.load_cifar10(cfg.data_path)


@reg.DATASETS.register("npz", reads_file=True)
def _npz(cfg):
  """A numpy ``.npz`` archive in ``data_path``."""
  return loaders.load_npz(cfg.data_path)


def load_dataset(cfg: Config) -> datasets.Dataset:
  """The configured dataset (seeded where generated).

  Raises:
    ConfigError: the data cannot be loaded or generated with these
      settings (a missing or malformed file names the file).
  """
  return _as_user_error(f"dataset={cfg.dataset}",
                        reg.DATASETS.get(cfg.dataset), cfg)


# -------------------------------------------------------------- partitions
# Seeded by ``seed``; see :mod:`fedjax_bsa.data.partition`.


@reg.PARTITIONS.register("iid")
def _iid(cfg, ds):
  """Uniformly random, near-equal shards."""
  return partition_lib.iid(len(ds.y_train), cfg.num_clients, cfg.seed)


@reg.PARTITIONS.register("dirichlet")
def _dirichlet(cfg, ds):
  """Label skew with Dirichlet(``alpha``) class proportions (NIID-Bench),
  every client with at least ``min_examples``."""
  return partition_lib.dirichlet(ds.y_train, cfg.num_clients, cfg.alpha,
                                 cfg.seed, cfg.min_examples)


@reg.PARTITIONS.register("shards")
def _shards(cfg, ds):
  """McMahan et al.'s label shards, ``shards_per_client`` each."""
  return partition_lib.shards(ds.y_train, cfg.num_clients, cfg.seed,
                              cfg.shards_per_client)


@reg.PARTITIONS.register("quantity")
def _quantity(cfg, ds):
  """Quantity skew: lognormal(``quantity_sigma``) client sizes, at least
  ``min_examples``, labels IID."""
  return partition_lib.quantity(len(ds.y_train), cfg.num_clients, cfg.seed,
                                method="lognormal", alpha=cfg.alpha,
                                sigma=cfg.quantity_sigma,
                                min_examples=cfg.min_examples)


@reg.PARTITIONS.register("natural", natural=True)
def _natural(cfg, ds):
  """One client per natural owner of the data (``num_clients`` is not
  read)."""
  del cfg
  if ds.client_ids is None:
    raise ValueError("partition 'natural' needs client_ids, got None (the "
                     "dataset has no natural clients)")
  if len(ds.client_ids) != len(ds.y_train):
    raise ValueError(f"client_ids has {len(ds.client_ids)} entries, labels "
                     f"{len(ds.y_train)}")
  return partition_lib.natural(ds.client_ids)


def make_parts(cfg: Config, ds: datasets.Dataset) -> list:
  """The configured partition of ``ds``'s training set.

  Raises:
    ConfigError: the partition cannot be drawn with these settings (e.g.
      Dirichlet resampling cannot give every client ``min_examples``).
  """
  return _as_user_error(f"partition={cfg.partition} (seed={cfg.seed})",
                        reg.PARTITIONS.get(cfg.partition), cfg, ds)


# ------------------------------------------------------------------ models
# The built-in models are registered in :mod:`fedjax_bsa.setup.models`.


def model_name(cfg: Config, ds: datasets.Dataset) -> str:
  """The model the config names; ``auto`` picks the dataset's own (its
  registered ``auto_model``: cnn1d for mnist1d, logreg for synthetic), else
  cnn for examples of two or more axes (images), mlp otherwise."""
  if cfg.model != "auto":
    return cfg.model
  own = reg.DATASETS.prop(cfg.dataset, "auto_model")
  if own is not None:
    return own
  return "cnn" if ds.x_train.ndim >= 3 else "mlp"


def make_model(cfg: Config, ds: datasets.Dataset) -> models.Model:
  """The configured model for ``ds``'s examples and classes: the registered
  model is given the config, the shape of one example and the class
  count."""
  return reg.MODELS.get(model_name(cfg, ds))(cfg, ds.x_train.shape[1:],
                                             ds.num_classes)


# --------------------------------------------------------------- resources
# The built-in profiles are registered in :mod:`fedjax_bsa.setup.resources`.


def make_resources(cfg: Config, num_clients: int):
  """The configured resource profile for ``num_clients`` clients. The
  profile is given the config with ``seed + 1``: the devices' own random
  stream, apart from the partition's."""
  return _as_user_error(f"resources={cfg.resources}",
                        reg.RESOURCE_PROFILES.get(cfg.resources),
                        cfg.replace(seed=cfg.seed + 1), num_clients)


# ------------------------------------------------------------------- build


def build(cfg: Config, dataset: datasets.Dataset | None = None
          ) -> Experiment:
  """Builds the host-side pieces of an experiment from a config.

  Args:
    cfg: the settings (validated here).
    dataset: the dataset, if already loaded (default: ``load_dataset``).

  Raises:
    ConfigError: a setting that cannot be honoured with this data (e.g.
      more clients per round than the partition has clients).
  """
  cfg.validate()
  ds = dataset if dataset is not None else load_dataset(cfg)
  parts = make_parts(cfg, ds)
  if cfg.clients_per_round > len(parts):
    raise ConfigError(f"clients_per_round={cfg.clients_per_round} is out of "
                      f"range: the partition has {len(parts)} clients")
  res = make_resources(cfg, len(parts))
  model = make_model(cfg, ds)
  params = jax.eval_shape(model.init, jax.random.key(0))
  return Experiment(cfg, ds, parts, res, model,
                    algorithms.make_algorithm(cfg), clock.model_bytes(params))


def reference_speed(res) -> np.float32:
  """The median client speed (``resource_proportional``'s unit)."""
  return np.float32(np.median(np.asarray(res.speed)))
