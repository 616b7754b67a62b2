"""Name -> factory registries: every choice a setting can name lives here.

A :class:`Registry` maps a name (the value of a setting such as
``algorithm=fednova``) to the factory that builds it. The built-in choices
register themselves when their module is imported; a user adds their own
from Python, before building an experiment::

  from fedjax_bsa import registry

  @registry.ALGORITHMS.register("my_avg")
  def my_avg(cfg):
    ...

  Config(algorithm="my_avg").validate()     # now allowed

:class:`~fedjax_bsa.config.Config` validates a setting against its registry
at validation time, so the allowed values named in an error are always the
registered ones. See ``docs/extending.md``.
"""

from __future__ import annotations

import importlib
from typing import Callable, Iterator

__all__ = ["Registry", "ALGORITHMS", "CLIENT_OPTIMIZERS", "SERVER_OPTIMIZERS",
           "CONTROLLERS", "DATASETS", "PARTITIONS", "MODELS",
           "RESOURCE_PROFILES", "ROUND_POLICIES", "LOCAL_WORK",
           "DEADLINE_RULES", "SCHEDULES", "all_registries"]


class Registry:
  """An ordered mapping from names to factories.

  Args:
    what: the setting it serves (used in error messages).
    modules: modules whose import registers the built-in choices (imported
      lazily, on first lookup, so that importing the registry is cheap and
      free of cycles).

  >>> r = Registry("colour")
  >>> _ = r.register("red")(lambda: 1)
  >>> r.names(), r.get("red")()
  (('red',), 1)
  """

  def __init__(self, what: str, modules: tuple[str, ...] = (),
               properties: dict | None = None):
    self.what = what
    self._modules = modules
    self._loaded = not modules
    self._items: dict[str, Callable] = {}
    self._props: dict[str, dict] = {}
    self.properties = dict(properties or {})

  def register(self, name: str, factory: Callable | None = None, **props):
    """Registers ``factory`` under ``name`` (usable as a decorator), with
    the choice's properties (``props``: what validation, the driver and the
    report ask of it, e.g. ``needs_deadline=True``; each registry names the
    properties it knows, with their defaults, in ``properties``).

    Re-registering a name replaces the previous factory (so a notebook can
    redefine its own choice).
    """
    if not name or not isinstance(name, str):
      raise ValueError(f"a {self.what} name must be a non-empty string, got "
                       f"{name!r}")
    unknown = sorted(set(props) - set(self.properties))
    if unknown:
      raise ValueError(f"{self.what} {name!r}: unknown propert"
                       f"{'y' if len(unknown) == 1 else 'ies'} "
                       f"{', '.join(unknown)} (known: "
                       f"{', '.join(self.properties) or 'none'})")

    def add(f):
      self._items[name] = f
      self._props[name] = dict(self.properties, **props)
      return f
    return add if factory is None else add(factory)

  def prop(self, name: str, key: str):
    """Property ``key`` of the choice ``name`` (its registry's default for a
    choice that did not set it).

    >>> r = Registry("shape", properties=dict(round=False))
    >>> _ = r.register("disc", round=True)(lambda: 0)
    >>> _ = r.register("box")(lambda: 0)
    >>> r.prop("disc", "round"), r.prop("box", "round")
    (True, False)
    """
    self._load()
    if key not in self.properties:
      raise KeyError(f"{self.what} registry has no property {key!r}")
    return self._props.get(name, self.properties)[key]

  def _load(self) -> None:
    if not self._loaded:
      self._loaded = True
      for m in self._modules:
        importlib.import_module(m)

  def names(self) -> tuple[str, ...]:
    """The registered names, in registration order."""
    self._load()
    return tuple(self._items)

  def __contains__(self, name) -> bool:
    self._load()
    return name in self._items

  def __iter__(self) -> Iterator[str]:
    return iter(self.names())

  def get(self, name: str) -> Callable:
    """The factory registered as ``name``.

    Raises:
      ValueError: naming the setting, the value and the registered names.
    """
    self._load()
    if name not in self._items:
      raise ValueError(f"{self.what}={name!r} is not allowed: choose one of "
                       f"{', '.join(self._items)}")
    return self._items[name]


_P = "fedjax_bsa."
ALGORITHMS = Registry("algorithm", (_P + "algorithms",))
CLIENT_OPTIMIZERS = Registry("client_optimizer", (_P + "algorithms",))
SERVER_OPTIMIZERS = Registry("server_optimizer", (_P + "algorithms",))
#: quantized: the controller rounds its batches to the kernel's microbatch
#: (so the microbatch is part of its plans, never a layout choice)
CONTROLLERS = Registry("controller", (_P + "plans",),
                       dict(quantized=False))
SCHEDULES = Registry("schedule", (_P + "plans",))
#: needs_deadline: the protocol reads the round's deadline
LOCAL_WORK = Registry("local_work", (_P + "plans",),
                      dict(needs_deadline=False))
#: takes_deadline: the rule's deadline is the ``deadline`` setting
DEADLINE_RULES = Registry("deadline_rule", (_P + "plans",),
                          dict(takes_deadline=False))
ROUND_POLICIES = Registry("round_policy", (_P + "plans",),
                          dict(needs_deadline=False))
#: reads_file: the dataset reads ``data_path``; seeded: its data depend on
#: ``seed`` (a sweep over seeds loads it per seed)
DATASETS = Registry("dataset", (_P + "experiment",),
                    dict(reads_file=False, seeded=False))
PARTITIONS = Registry("partition", (_P + "experiment",))
MODELS = Registry("model", (_P + "experiment",))
#: reads_file: the profile reads ``trace_path``
RESOURCE_PROFILES = Registry("resources", (_P + "experiment",),
                             dict(reads_file=False))


def all_registries() -> dict[str, Registry]:
  """Every registry, keyed by the setting it serves."""
  regs = (ALGORITHMS, CLIENT_OPTIMIZERS, SERVER_OPTIMIZERS, CONTROLLERS,
          SCHEDULES, LOCAL_WORK, DEADLINE_RULES, ROUND_POLICIES, DATASETS,
          PARTITIONS, MODELS, RESOURCE_PROFILES)
  return {r.what: r for r in regs}
