"""From a :class:`~fedjax_bsa.config.Config` to the arrays and functions of
one simulation: dataset, partition, device data, resources, model,
controller. Host-side, run once before the compiled loop."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_bsa import clock
from fedjax_bsa import controllers
from fedjax_bsa import federated
from fedjax_bsa import kernel as kernel_lib
from fedjax_bsa import models
from fedjax_bsa import resources as resources_lib
from fedjax_bsa.config import Config
from fedjax_bsa.data import datasets
from fedjax_bsa.data import partition as partition_lib

__all__ = ["Experiment", "build", "load_dataset", "make_parts",
           "make_controller", "default_model"]


class Experiment(NamedTuple):
  """Everything a simulation needs, built from a config."""
  cfg: Config
  dataset: datasets.Dataset
  parts: list
  data: federated.FederatedData | None    # numpy, [N, n_max, ...]
  resources: resources_lib.ClientResources  # numpy, [N]
  model: models.Model
  controller: controllers.Controller
  lanes: int
  model_bytes: int


def load_dataset(cfg: Config) -> datasets.Dataset:
  """The configured dataset (seeded where generated)."""
  if cfg.dataset == "digits":
    return datasets.load("digits")
  if cfg.dataset == "mnist1d":
    return datasets.load("mnist1d", num_examples=cfg.num_examples,
                         seed=cfg.seed)
  if cfg.dataset == "synthetic":
    return datasets.load("synthetic", alpha=cfg.synthetic_alpha,
                         beta=cfg.synthetic_beta, num_clients=cfg.num_clients,
                         seed=cfg.seed)
  return datasets.load(cfg.dataset, path=cfg.data_path)


def make_parts(cfg: Config, ds: datasets.Dataset) -> list:
  """The configured partition of ``ds``'s training set."""
  name = cfg.partition
  return partition_lib.make_partition(
      name, ds.y_train, None if name == "natural" else cfg.num_clients,
      cfg.seed, alpha=cfg.alpha, min_examples=cfg.min_examples,
      shards_per_client=cfg.shards_per_client,
      quantity_sigma=cfg.quantity_sigma, client_ids=ds.client_ids)


def default_model(cfg: Config, ds: datasets.Dataset) -> str:
  """The model ``auto`` picks: cnn1d for mnist1d, logreg for synthetic,
  cnn for images, mlp otherwise."""
  if cfg.model != "auto":
    return cfg.model
  if cfg.dataset == "mnist1d":
    return "cnn1d"
  if cfg.dataset == "synthetic":
    return "logreg"
  if ds.x_train.ndim >= 3:
    return "cnn"
  return "mlp"


def make_controller(cfg: Config, resources=None, client_lr=None,
                    kappa=None, ema_decay=None,
                    reference_speed=None) -> controllers.Controller:
  """The configured controller, wrapped in the memory/time :func:`clamp`.

  ``client_lr``, ``kappa``, ``ema_decay`` and ``reference_speed`` (the
  ``resource_proportional`` controller's speed scale) may be traced scalars
  (sweeps); by default they come from ``cfg`` and ``resources``.
  """
  lr = cfg.client_lr if client_lr is None else client_lr
  kappa = cfg.kappa if kappa is None else kappa
  decay = cfg.ema_decay if ema_decay is None else ema_decay
  name = cfg.controller
  quantize = None
  if name == "constant":
    inner = controllers.constant(cfg.batch_size, cfg.local_steps, lr)
  elif name == "random":
    inner = controllers.random(cfg.batch_min, cfg.batch_max, cfg.local_steps,
                               lr)
  elif name == "schedule":
    inner = controllers.schedule(cfg.schedule, cfg.batch_size, cfg.batch_max,
                                 cfg.schedule_every, cfg.rounds,
                                 cfg.local_steps, lr)
  elif name == "resource_proportional":
    ref = reference_speed
    if ref is None:
      ref = (float(np.median(resources.speed)) if resources is not None
             else cfg.base_speed)
    inner = controllers.resource_proportional(cfg.batch_size, ref,
                                              cfg.local_steps, lr)
  elif name == "noise_scale":
    inner = controllers.noise_scale(
        cfg.batch_size, cfg.batch_min, cfg.batch_max, kappa, cfg.local_steps,
        lr, decay, cfg.microbatch, cfg.time_budget)
    quantize = cfg.microbatch
  else:  # validated by Config
    raise ValueError(f"controller={name!r} is not allowed")
  if cfg.local_epochs > 0:
    inner = controllers.epochs(inner, cfg.local_epochs)
  return controllers.clamp(inner, microbatch=quantize,
                           time_budget=cfg.time_budget)


def make_resources(cfg: Config, num_clients: int):
  return resources_lib.make_resources(
      cfg.resources, num_clients, cfg.seed + 1, base_speed=cfg.base_speed,
      speed_sigma=cfg.speed_sigma, step_overhead=cfg.step_overhead,
      memory_cap=cfg.memory_cap, memory_sigma=cfg.memory_sigma,
      bandwidth=cfg.bandwidth, availability=cfg.availability,
      trace_path=cfg.trace_path or None)


def build(cfg: Config, n_max: int | None = None, *,
          with_data: bool = True, dataset: datasets.Dataset | None = None
          ) -> Experiment:
  """Builds the host-side pieces of a simulation from a validated config.

  Args:
    cfg: the settings.
    n_max: rows per client in ``data`` (default: the largest client).
    with_data: build ``data`` (False: ``data`` is None, for callers that
      place the clients' rows themselves, e.g. sharded over hosts).
    dataset: the dataset, if already loaded (default: ``load_dataset``).
  """
  cfg.validate()
  ds = dataset if dataset is not None else load_dataset(cfg)
  parts = make_parts(cfg, ds)
  num_clients = len(parts)
  if cfg.clients_per_round > num_clients:
    raise ValueError(f"clients_per_round={cfg.clients_per_round} is out of "
                     f"range: the partition has {num_clients} clients")
  data = (federated.from_partition(ds.x_train, ds.y_train, parts, n_max)
          if with_data else None)
  res = make_resources(cfg, num_clients)
  model = models.make_model(default_model(cfg, ds), ds.x_train.shape[1:],
                            ds.num_classes, hidden=cfg.hidden)
  params = jax.eval_shape(model.init, jax.random.key(0))
  lanes = cfg.lanes or kernel_lib.default_lanes(cfg.clients_per_round)
  if cfg.algorithm == "scaffold":
    lanes = cfg.clients_per_round
  return Experiment(cfg, ds, parts, data, res, model,
                    make_controller(cfg, res), lanes,
                    clock.model_bytes(params))
