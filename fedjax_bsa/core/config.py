"""Every setting of a simulation, declared once, as one frozen dataclass.

Settings are flat (``rounds``, ``client_lr``, ...) so that ``--set key=value``,
YAML/JSON files and sweeps all address them the same way. Each field carries
its metadata, the single place a setting is described:

* ``choices``: a :class:`~fedjax_bsa.core.registry.Registry` (or tuple) of the
  allowed names; ``lo``/``hi``/``lo_open``: the allowed range;
* ``traced=True``: the value enters the compiled program as an array
  (:func:`hparams`), so a sweep may vary it without recompiling; whoever
  consumes it reads ``hparams[name]``;
* ``host=True``: the value shapes host-built inputs of unchanged shape
  (partition, resources, seed), so a sweep may vary it too;
* ``part``: the section it belongs to (for ``fedjax-bsa settings``).

:data:`SWEEPABLE` and :func:`hparams` are derived from this metadata.
:func:`Config.validate` checks every field and raises a :class:`ConfigError`
that names the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

import numpy as np

from fedjax_bsa.core import registry as reg
from fedjax_bsa.core.fields import check_type as _check_type
from fedjax_bsa.core.fields import choices as _choices
from fedjax_bsa.core.fields import coerce as _coerce
from fedjax_bsa.core.fields import ConfigError
from fedjax_bsa.core.fields import data_field as _data
from fedjax_bsa.core.fields import fed_field as _fed
from fedjax_bsa.core.fields import field as _field
from fedjax_bsa.core.fields import load_config_file
from fedjax_bsa.core.fields import plan_field as _plan
from fedjax_bsa.core.fields import res_field as _res
from fedjax_bsa.core.fields import settings_table

__all__ = ["Config", "ConfigError", "HParams", "load_config_file",
  "parse_assignments",
           "SWEEPABLE", "TRACED", "hparams", "check_sweepable",
           "RATE_SCALINGS", "GUARDS"]

#: The displacement controller's rate rules (``rate_scaling``) and guard
#: modes (``guard``), which :mod:`fedjax_bsa.plans.displacement` reads.
RATE_SCALINGS = ("linear", "adascale")
GUARDS = ("backoff", "off")


def resolve_microbatch(microbatch: int, batch: int, noise_stats: bool) -> int:
  """The kernel's microbatch ``mu``: ``microbatch`` when set (> 0), else
  half the reference batch rounded up, so that a step at ``b_0`` fills two
  microbatches (the kernel estimates noise in steps of two or more), or
  ``b_0`` itself without noise statistics (one microbatch a step, no
  padding).

  >>> resolve_microbatch(0, 10, True), resolve_microbatch(0, 10, False)
  (5, 10)
  >>> resolve_microbatch(4, 10, True), resolve_microbatch(0, 1, True)
  (4, 1)
  """
  if int(microbatch) > 0:
    return int(microbatch)
  b = max(int(batch), 1)
  return -(-b // 2) if noise_stats else b


@dataclasses.dataclass(frozen=True)
class Config:
  """All settings of one simulation (defaults: the embedded digits run)."""
  # --- data
  dataset: str = _data("digits", "dataset", choices=reg.DATASETS)
  data_path: str = _data("", "file or folder for leaf / cifar10 / npz")
  num_examples: int = _data(4000, "examples generated (mnist1d)", lo=100)
  synthetic_alpha: float = _data(1.0, "Synthetic(alpha, beta): model skew",
                                 lo=0.0, host=True)
  synthetic_beta: float = _data(1.0, "Synthetic(alpha, beta): feature "
                                "skew", lo=0.0, host=True)
  num_clients: int = _data(100, "clients in the federation", lo=1)
  partition: str = _data("dirichlet", "how train data is split",
                         choices=reg.PARTITIONS)
  alpha: float = _data(0.3, "Dirichlet concentration (label skew)", lo=0.0,
                       lo_open=True, host=True)
  min_examples: int = _data(5, "fewest examples a client may hold", lo=1,
                            host=True)
  shards_per_client: int = _data(2, "shards per client (shards)", lo=1,
                                 host=True)
  quantity_sigma: float = _data(1.0, "lognormal sigma of client sizes",
                                lo=0.0, host=True)
  # --- model
  model: str = _field("auto", "model ('auto' picks the dataset's own)",
                      choices=reg.MODELS, part="model")
  hidden: int = _field(256, "hidden width of the MLP", lo=1, part="model")
  # --- federated optimisation
  rounds: int = _fed(150, "communication rounds", lo=1)
  clients_per_round: int = _fed(10, "cohort size", lo=1)
  algorithm: str = _fed("fedavg", "federated algorithm",
                        choices=reg.ALGORITHMS)
  prox_mu: float = _fed(0.01, "FedProx proximal weight", lo=0.0, traced=True)
  feddyn_alpha: float = _fed(0.01, "FedDyn regularisation weight alpha",
                             lo=0.0, lo_open=True, traced=True)
  client_optimizer: str = _fed("sgd", "client optimizer (optax)",
                               choices=reg.CLIENT_OPTIMIZERS)
  client_lr: float = _fed(0.2, "client learning rate", lo=0.0, lo_open=True,
                          traced=True)
  lr_decay: float = _fed(1.0, "every client's rate is multiplied by this "
                         "every lr_decay_every rounds, after the controller "
                         "(FedScale's decay_factor; 1: none)", lo=0.0,
                         lo_open=True, hi=1.0, traced=True)
  lr_decay_every: int = _fed(10, "rounds between learning-rate decays",
                             lo=1, traced=True)
  lr_min: float = _fed(0.0, "the decayed rate's floor (FedScale's "
                       "min_learning_rate)", lo=0.0, traced=True)
  client_momentum: float = _fed(0.0, "client heavy-ball momentum (sgd, "
                                "momentum)", lo=0.0, hi=0.999)
  server_optimizer: str = _fed("sgd", "server optimizer (optax)",
                               choices=reg.SERVER_OPTIMIZERS)
  server_lr: float = _fed(1.0, "server learning rate", lo=0.0, lo_open=True,
                          traced=True)
  server_momentum: float = _fed(0.9, "server momentum (momentum)", lo=0.0,
                                hi=0.999)
  # --- plans: batch-size controller and local work
  controller: str = _plan("displacement", "batch-size controller",
                          choices=reg.CONTROLLERS)
  batch_size: int = _plan(8, "constant batch / reference batch b_0", lo=1,
                          traced=True)
  batch_min: int = _plan(1, "smallest batch a controller may pick", lo=1)
  batch_max: int = _plan(128, "largest batch a controller may pick", lo=1)
  local_work: str = _plan("steps", "local work per round: fixed steps, "
                          "epochs, or what fits the deadline",
                          choices=reg.LOCAL_WORK)
  local_steps: int = _plan(10, "local steps per round (local_work=steps); "
                           "the cap with local_work=deadline", lo=1,
                           traced=True)
  local_epochs: float = _plan(1.0, "local epochs (local_work=epochs): "
                              "steps = ceil(epochs * n_k / b_k)", lo=0.0,
                              lo_open=True, traced=True)
  schedule: str = _plan("doubling", "schedule controller's rule",
                        choices=reg.SCHEDULES)
  schedule_every: int = _plan(25, "rounds between schedule changes", lo=1)
  kappa: float = _plan(1.0, "noise_scale: batch = kappa * critical batch",
                       lo=0.0, lo_open=True, traced=True)
  ema_decay: float = _plan(0.9, "noise_scale/goodput: EMA decay", lo=0.0,
                           hi=0.999, traced=True)
  max_gain: float = _plan(4.0, "cap on the learning-rate gain over "
                          "client_lr (AdaScale's, or displacement's rule)",
                          lo=1.0, traced=True)
  budget: float = _plan(0.0, "displacement: first round's budget Lambda = "
                        "lr * steps (0: client_lr * local_steps)", lo=0.0,
                        traced=True)
  budget_band: float = _plan(4.0, "displacement: Lambda stays within "
                             "[Lambda_0 / band, Lambda_0 * band]", lo=1.0,
                             traced=True)
  anneal_patience: int = _plan(0, "displacement: halve the noise "
                               "temperature (rate over batch) after this "
                               "many rounds without a 1% fall of the "
                               "smoothed training loss (0: never)", lo=0,
                               traced=True)
  rate_scaling: str = _plan("linear", "displacement: rate at batch b over "
                            "the user's (batch_size, client_lr): linear "
                            "(same noise temperature) or adascale (Johnson "
                            "et al. 2020), capped by max_gain",
                            choices=RATE_SCALINGS)
  guard: str = _plan("backoff", "displacement: back off on a bad round "
                     "(backoff) or not (off)", choices=GUARDS)
  time_budget: float = _plan(0.0, "per-client local-time budget in s (0: "
                             "none)", lo=0.0, traced=True)
  # --- kernel
  microbatch: int = _field(0, "kernel microbatch size mu (0: half of "
                           "batch_size rounded up, so a step at b_0 estimates "
                           "noise; batch_size without noise_stats)", lo=0,
                           part="kernel")
  lanes: int = _field(0, "vmapped lanes (0: from the backend's cost model)",
                      lo=0, part="kernel")
  per_slot: int = _field(0, "microbatches per lane per loop iteration (0: "
                         "a step at batch_size per iteration)", lo=0, hi=64,
                         part="kernel")
  layout: str = _field("measure", "how lanes, microbatch and per_slot left "
                       "at 0 are chosen: time a few layouts on this model and "
                       "mix once per machine (measure; cached) or the "
                       "backend's cost model (rule)",
                       choices=("measure", "rule"), part="kernel")
  noise_stats: bool = _field(True, "estimate gradient noise in the kernel",
                             part="kernel")
  # --- resources and clock
  resources: str = _res("lognormal", "client resource profile",
                        choices=reg.RESOURCE_PROFILES)
  trace_path: str = _res("", "FedScale device trace (resources=trace)")
  base_speed: float = _res(2000.0, "examples per simulated second", lo=0.0,
                           lo_open=True, host=True)
  speed_sigma: float = _res(0.5, "lognormal sigma of client speeds", lo=0.0,
                            host=True)
  step_overhead: float = _res(0.01, "simulated seconds per local step",
                              lo=0.0, host=True)
  memory_cap: int = _res(128, "largest batch a client can hold", lo=1,
                         host=True)
  memory_sigma: float = _res(0.0, "lognormal sigma of memory caps", lo=0.0,
                             host=True)
  bandwidth: float = _res(1e6, "bytes per second, each way", lo=0.0,
                          lo_open=True, host=True)
  availability: float = _res(1.0, "probability a client is available",
                             lo=0.0, hi=1.0, lo_open=True, host=True)
  round_policy: str = _res("wait_all", "what a round waits for",
                           choices=reg.ROUND_POLICIES)
  deadline_rule: str = _res("fedbalancer", "how the round's deadline is "
                            "set", choices=reg.DEADLINE_RULES)
  deadline: float = _res(0.0, "deadline in simulated s (deadline_rule="
                         "fixed; 0: none)", lo=0.0, traced=True)
  deadline_quantile: float = _res(0.8, "deadline_rule=quantile: quantile of "
                                  "the cohort's predicted one-epoch times",
                                  lo=0.0, hi=1.0, lo_open=True, traced=True)
  # --- run
  seed: int = _field(0, "random seed", lo=0, host=True, part="run")
  eval_every: int = _field(10, "rounds between evaluations", lo=1,
                           part="run")
  progress: bool = _field(True, "show a progress bar", part="run")

  def __post_init__(self):
    # a Config is valid from birth: Config(rounds=-1) fails here, as the
    # command line does, not later inside a run
    self.validate()

  def validate(self) -> "Config":
    """Checks every field and the relations between them.

    Returns:
      ``self``, so that ``Config(...).validate()`` chains.

    Raises:
      ConfigError: naming the field, its value and what is allowed.
    """
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      _check_type(f, value)
      meta = f.metadata
      allowed = _choices(f)
      if allowed is not None and value not in allowed:
        raise ConfigError(f"{f.name}={value!r} is not allowed: choose one of "
                          f"{', '.join(allowed)}")
      lo, hi = meta.get("lo"), meta.get("hi")
      if lo is not None and (value < lo or (meta["lo_open"] and value == lo)):
        bound = f"> {lo}" if meta["lo_open"] else f">= {lo}"
        raise ConfigError(f"{f.name}={value!r} is out of range: must be "
                          f"{bound}" + (f" and <= {hi}" if hi is not None
                                        else ""))
      if hi is not None and value > hi:
        raise ConfigError(f"{f.name}={value!r} is out of range: must be <= "
                          f"{hi}")
    if self.clients_per_round > self.num_clients:
      raise ConfigError(
          f"clients_per_round={self.clients_per_round} is out of range: must "
          f"be <= num_clients={self.num_clients}")
    if self.batch_min > self.batch_max:
      raise ConfigError(f"batch_min={self.batch_min} is out of range: must be "
                        f"<= batch_max={self.batch_max}")
    # relations between settings ask the registered choices' properties
    takes = reg.DEADLINE_RULES.prop(self.deadline_rule, "takes_deadline")
    if self.deadline > 0 and not takes:
      raise ConfigError(f"deadline={self.deadline} is not allowed with "
                        f"deadline_rule={self.deadline_rule}: it is the "
                        "fixed rule's deadline (set deadline_rule=fixed)")
    why = [f"{k}={getattr(self, k)}" for k, r in (
        ("round_policy", reg.ROUND_POLICIES), ("local_work", reg.LOCAL_WORK))
           if r.prop(getattr(self, k), "needs_deadline")]
    if why and takes and self.deadline <= 0:
      raise ConfigError(f"deadline={self.deadline} is out of range: {why[0]} "
                        f"with deadline_rule={self.deadline_rule} needs "
                        "deadline > 0")
    if reg.DATASETS.prop(self.dataset, "reads_file") and not self.data_path:
      raise ConfigError(f"data_path='' is not allowed: dataset={self.dataset} "
                        "reads a file, give its path")
    if (reg.RESOURCE_PROFILES.prop(self.resources, "reads_file")
        and not self.trace_path):
      raise ConfigError(f"trace_path='' is not allowed: resources="
                        f"{self.resources} reads a FedScale device trace, "
                        "give its path")
    return self

  def replace(self, **changes) -> "Config":
    """Returns a validated copy with ``changes`` applied (strings parsed)."""
    return dataclasses.replace(self, **_coerce_all(changes)).validate()

  @property
  def kernel_microbatch(self) -> int:
    """The kernel's ``mu``: ``microbatch``, or what 0 stands for
    (:func:`resolve_microbatch`)."""
    return resolve_microbatch(self.microbatch, self.batch_size,
                                     self.noise_stats)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "Config":
    return cls().replace(**dict(values))

  @classmethod
  def describe(cls) -> str:
    """Every setting: its default, what a sweep may vary (``traced``:
    inside the compiled program; ``host``: in the host-built inputs), the
    allowed values and the meaning, grouped by part (``fedjax-bsa
    settings``)."""
    return settings_table(dataclasses.fields(cls))


def _fields() -> dict[str, dataclasses.Field]:
  return {f.name: f for f in dataclasses.fields(Config)}


def _coerce_all(changes: Mapping[str, Any]) -> dict[str, Any]:
  return {k: _coerce(_fields(), k, v) for k, v in changes.items()}


def parse_assignments(items: list[str]) -> dict[str, str]:
  """Parses ``["key=value", ...]`` (``--set`` arguments) into a dict.

  Dotted keys (``config.rounds``) are accepted; the last part names the field.
  """
  out = {}
  for item in items:
    if "=" not in item:
      raise ConfigError(f"--set {item!r} is not allowed: expected key=value")
    key, value = item.split("=", 1)
    key = key.strip().split(".")[-1]
    _coerce(_fields(), key, value)  # names an unknown key early
    out[key] = value
  return out


#: Settings that enter the compiled program as arrays (:func:`hparams`).
TRACED = tuple(f.name for f in dataclasses.fields(Config)
               if f.metadata["traced"])

#: Settings a sweep may vary in one compiled program: the traced ones and
#: those that only change host-built inputs of the same shapes.
SWEEPABLE = TRACED + tuple(f.name for f in dataclasses.fields(Config)
                           if f.metadata["host"])


class HParams(NamedTuple("_HParams", [(n, Any) for n in TRACED
                                      + ("reference_speed",)])):
  """The traced settings of one experiment (``[E]`` once a sweep stacks
  them), a field per :data:`TRACED` setting, generated from the config's
  metadata, plus ``reference_speed`` (the median client speed, set by the
  driver from the experiment's devices; None until then). Read as
  ``hp.client_lr`` or ``hp["client_lr"]`` (the name's the same either way);
  a pytree, so ``vmap`` and ``tree.map`` see its arrays."""
  __slots__ = ()

  def __getitem__(self, key):
    if isinstance(key, str):
      if key not in self._fields:
        raise KeyError(f"{key!r} is not a traced setting (traced: "
                       f"{', '.join(self._fields)})")
      return getattr(self, key)
    return super().__getitem__(key)


def hparams(cfg: Config, reference_speed=None) -> HParams:
  """The traced settings as numpy scalars (float32 or int32).

  Consumers in compiled code read ``hparams[name]``; a sweep stacks these
  over experiments and ``vmap``s them.

  >>> hp = hparams(Config(client_lr=0.3))
  >>> round(float(hp.client_lr), 6), hp["local_steps"].dtype.name
  (0.3, 'int32')
  """
  values = {}
  for name in TRACED:
    v = getattr(cfg, name)
    values[name] = np.int32(v) if isinstance(v, int) else np.float32(v)
  return HParams(**values, reference_speed=reference_speed)


def check_sweepable(keys) -> None:
  """Raises ``ConfigError`` naming the first key a sweep cannot vary."""
  for key in keys:
    if key not in SWEEPABLE:
      raise ConfigError(
          f"cannot sweep {key!r} in one compiled program: it changes array "
          "shapes or the program's static structure (run separate sweeps "
          f"for each value); sweepable settings: {', '.join(SWEEPABLE)}")
