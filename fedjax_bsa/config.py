"""Every setting of a simulation, as one frozen, validated dataclass.

Settings are flat (``rounds``, ``client_lr``, ...) so that ``--set key=value``,
YAML/JSON files and sweeps all address them the same way. Each field carries
its allowed values in its metadata; :func:`Config.validate` checks them and
raises a ``ValueError`` that names the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping

__all__ = ["Config", "ConfigError", "load_config_file", "parse_assignments"]


class ConfigError(ValueError):
  """A setting is unknown or outside its allowed values."""


def _field(default, help_: str, *, choices=None, lo=None, hi=None,
           lo_open=False):
  return dataclasses.field(
      default=default,
      metadata=dict(help=help_, choices=choices, lo=lo, hi=hi,
                    lo_open=lo_open))


DATASETS = ("digits", "mnist1d", "synthetic", "leaf", "cifar10", "npz")
PARTITIONS = ("iid", "dirichlet", "shards", "quantity", "natural")
MODELS = ("auto", "mlp", "cnn1d", "logreg", "cnn")
ALGORITHMS = ("fedavg", "fedprox", "fednova", "scaffold")
SERVER_OPTIMIZERS = ("sgd", "momentum", "adam", "yogi")
CONTROLLERS = ("constant", "random", "schedule", "resource_proportional",
               "noise_scale")
SCHEDULES = ("step", "linear", "doubling")
RESOURCE_PROFILES = ("uniform", "lognormal", "tiers", "trace")
ROUND_POLICIES = ("wait_all", "deadline_drop", "deadline_partial")


@dataclasses.dataclass(frozen=True)
class Config:
  """All settings of one simulation (defaults: the embedded digits run)."""
  # --- data
  dataset: str = _field("digits", "dataset", choices=DATASETS)
  data_path: str = _field("", "file or folder for leaf / cifar10 / npz")
  num_examples: int = _field(4000, "examples generated (mnist1d)", lo=100)
  synthetic_alpha: float = _field(1.0, "Synthetic(alpha, beta): model skew",
                                  lo=0.0)
  synthetic_beta: float = _field(1.0, "Synthetic(alpha, beta): feature skew",
                                 lo=0.0)
  num_clients: int = _field(100, "clients in the federation", lo=1)
  partition: str = _field("dirichlet", "how train data is split",
                          choices=PARTITIONS)
  alpha: float = _field(0.3, "Dirichlet concentration (label skew)", lo=0.0,
                        lo_open=True)
  min_examples: int = _field(5, "fewest examples a client may hold", lo=1)
  shards_per_client: int = _field(2, "shards per client (shards)", lo=1)
  quantity_sigma: float = _field(1.0, "lognormal sigma of client sizes",
                                 lo=0.0)
  # --- model
  model: str = _field("auto", "model ('auto' picks the dataset's own)",
                      choices=MODELS)
  hidden: int = _field(256, "hidden width of the MLP", lo=1)
  # --- federated optimisation
  rounds: int = _field(150, "communication rounds", lo=1)
  clients_per_round: int = _field(10, "cohort size", lo=1)
  algorithm: str = _field("fedavg", "client objective and aggregation",
                          choices=ALGORITHMS)
  prox_mu: float = _field(0.01, "FedProx proximal weight", lo=0.0)
  client_lr: float = _field(0.2, "client SGD learning rate", lo=0.0,
                            lo_open=True)
  client_momentum: float = _field(0.0, "client SGD momentum", lo=0.0, hi=0.999)
  server_optimizer: str = _field("sgd", "server optimizer (optax)",
                                 choices=SERVER_OPTIMIZERS)
  server_lr: float = _field(1.0, "server learning rate", lo=0.0, lo_open=True)
  server_momentum: float = _field(0.9, "server momentum (momentum)", lo=0.0,
                                  hi=0.999)
  # --- batch-size controller
  controller: str = _field("noise_scale", "batch-size controller",
                           choices=CONTROLLERS)
  batch_size: int = _field(8, "constant batch / reference batch b_0", lo=1)
  batch_min: int = _field(8, "smallest batch a controller may pick", lo=1)
  batch_max: int = _field(128, "largest batch a controller may pick", lo=1)
  local_steps: int = _field(10, "local steps per round", lo=1)
  local_epochs: float = _field(0.0, "if > 0: steps = ceil(epochs * n_k / b_k)"
                               " instead of local_steps", lo=0.0)
  schedule: str = _field("doubling", "schedule controller's rule",
                         choices=SCHEDULES)
  schedule_every: int = _field(25, "rounds between schedule changes", lo=1)
  kappa: float = _field(1.0, "noise_scale: batch = kappa * B_simple", lo=0.0,
                        lo_open=True)
  ema_decay: float = _field(0.9, "noise_scale: EMA decay", lo=0.0, hi=0.999)
  time_budget: float = _field(0.0, "per-client local-time budget in s (0: "
                              "none)", lo=0.0)
  # --- kernel
  microbatch: int = _field(4, "kernel microbatch size mu", lo=1)
  lanes: int = _field(0, "vmapped lanes (0: automatic)", lo=0)
  noise_stats: bool = _field(True, "estimate gradient noise in the kernel")
  # --- resources and clock
  resources: str = _field("lognormal", "client resource profile",
                          choices=RESOURCE_PROFILES)
  trace_path: str = _field("", "FedScale device trace (resources=trace)")
  base_speed: float = _field(2000.0, "examples per simulated second", lo=0.0,
                             lo_open=True)
  speed_sigma: float = _field(0.5, "lognormal sigma of client speeds", lo=0.0)
  step_overhead: float = _field(0.01, "simulated seconds per local step",
                                lo=0.0)
  memory_cap: int = _field(128, "largest batch a client can hold", lo=1)
  memory_sigma: float = _field(0.0, "lognormal sigma of memory caps", lo=0.0)
  bandwidth: float = _field(1e6, "bytes per second, each way", lo=0.0,
                            lo_open=True)
  availability: float = _field(1.0, "probability a client is available",
                               lo=0.0, hi=1.0, lo_open=True)
  round_policy: str = _field("wait_all", "what a round waits for",
                             choices=ROUND_POLICIES)
  deadline: float = _field(0.0, "round deadline in simulated s (0: none)",
                           lo=0.0)
  # --- run
  seed: int = _field(0, "random seed", lo=0)
  eval_every: int = _field(10, "rounds between evaluations", lo=1)
  progress: bool = _field(True, "show a progress bar")

  # ------------------------------------------------------------------ api
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
      if meta.get("choices") is not None and value not in meta["choices"]:
        raise ConfigError(f"{f.name}={value!r} is not allowed: choose one of "
                          f"{', '.join(meta['choices'])}")
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
    if self.round_policy != "wait_all" and self.deadline <= 0:
      raise ConfigError(f"deadline={self.deadline} is out of range: "
                        f"round_policy={self.round_policy} needs deadline > 0")
    if self.dataset in ("leaf", "cifar10", "npz") and not self.data_path:
      raise ConfigError(f"data_path='' is not allowed: dataset={self.dataset} "
                        "reads a file, give its path")
    if self.resources == "trace" and not self.trace_path:
      raise ConfigError("trace_path='' is not allowed: resources=trace reads "
                        "a FedScale device trace, give its path")
    return self

  def replace(self, **changes) -> "Config":
    """Returns a validated copy with ``changes`` applied (strings parsed)."""
    return dataclasses.replace(self, **_coerce_all(changes)).validate()

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "Config":
    return cls().replace(**dict(values))

  @classmethod
  def describe(cls) -> str:
    """One line per field: name, default, allowed values, meaning."""
    lines = []
    for f in dataclasses.fields(cls):
      m = f.metadata
      allowed = ("|".join(m["choices"]) if m.get("choices") else
                 _range_text(m))
      lines.append(f"{f.name:<18} {f.default!s:<10} {allowed:<40} {m['help']}")
    return "\n".join(lines)


def _range_text(meta) -> str:
  lo, hi = meta.get("lo"), meta.get("hi")
  if lo is None and hi is None:
    return ""
  left = "(" if meta.get("lo_open") else "["
  return f"{left}{lo if lo is not None else '-inf'}, " \
         f"{hi if hi is not None else 'inf'}]"


_TYPE_WORDS = {int: "an integer", float: "a finite number", bool: "true or false",
               str: "a string"}


def _fields() -> dict[str, dataclasses.Field]:
  return {f.name: f for f in dataclasses.fields(Config)}


def _check_type(f: dataclasses.Field, value) -> None:
  want = type(f.default)
  ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
  if want is float and isinstance(value, int) and not isinstance(value, bool):
    ok = True
  if want is float and ok and not math.isfinite(value):
    ok = False
  if not ok:
    raise ConfigError(f"{f.name}={value!r} is not allowed: expected "
                      f"{_TYPE_WORDS[want]}")


def _coerce(name: str, value: Any) -> Any:
  fields = _fields()
  if name not in fields:
    raise ConfigError(f"unknown setting {name!r}: known settings are "
                      f"{', '.join(sorted(fields))}")
  want = type(fields[name].default)
  if not isinstance(value, str) or want is str:
    if want is float and isinstance(value, int) and not isinstance(value,
                                                                    bool):
      return float(value)
    return value
  text = value.strip()
  try:
    if want is bool:
      if text.lower() in ("1", "true", "yes", "on"):
        return True
      if text.lower() in ("0", "false", "no", "off"):
        return False
      raise ValueError(text)
    if want is int:
      return int(text)
    return float(text)
  except ValueError:
    raise ConfigError(f"{name}={value!r} is not allowed: expected "
                      f"{_TYPE_WORDS[want]}") from None


def _coerce_all(changes: Mapping[str, Any]) -> dict[str, Any]:
  return {k: _coerce(k, v) for k, v in changes.items()}


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
    _coerce(key, value)  # names an unknown key early
    out[key] = value
  return out


def load_config_file(path: str) -> dict[str, Any]:
  """Reads settings from a JSON or YAML file (a flat mapping)."""
  try:
    with open(path) as fh:
      text = fh.read()
  except OSError as e:
    raise ConfigError(f"--config {path}: cannot read: {e.strerror}") from None
  try:
    if path.endswith((".yaml", ".yml")):
      import yaml  # pylint: disable=g-import-not-at-top
      values = yaml.safe_load(text)
    else:
      values = json.loads(text)
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f"--config {path}: not valid JSON/YAML: {e}") from None
  if not isinstance(values, dict):
    raise ConfigError(f"--config {path}: expected a mapping of settings")
  return values
