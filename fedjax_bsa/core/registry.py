"""Name -> factory registries: every choice a setting can name lives here.

A :class:`Registry` maps a name (the value of a setting such as
``algorithm=fednova``) to the factory that builds it, with the choice's
properties. The built-in choices register themselves when their module is
imported, and importing :mod:`fedjax_bsa` imports them all (the registry,
in the lowest layer, names no module above it); a user adds their own from
Python, before building an experiment::

  from fedjax_bsa.core import registry

  @registry.ALGORITHMS.register("my_avg")
  def my_avg(cfg):
    ...

  Config(algorithm="my_avg").validate()     # now allowed

:class:`~fedjax_bsa.core.config.Config` validates a setting against its registry
at validation time, so the allowed values named in an error are always the
registered ones. See ``docs/extending.md``.
"""

from __future__ import annotations

from typing import Callable, Iterator

__all__ = ["Registry", "ALGORITHMS", "CLIENT_OPTIMIZERS", "SERVER_OPTIMIZERS",
           "CONTROLLERS", "DATASETS", "PARTITIONS", "MODELS",
           "RESOURCE_PROFILES", "ROUND_POLICIES", "LOCAL_WORK",
           "DEADLINE_RULES", "SCHEDULES", "all_registries"]


class Registry:
  """An ordered mapping from names to factories.

  Args:
    what: the setting it serves (used in error messages).
    properties: the properties a choice may declare, with their defaults.

  >>> r = Registry("colour")
  >>> _ = r.register("red")(lambda: 1)
  >>> r.names(), r.get("red")()
  (('red',), 1)
  """

  def __init__(self, what: str, properties: dict | None = None):
    self.what = what
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
    if key not in self.properties:
      raise KeyError(f"{self.what} registry has no property {key!r}")
    return self._props.get(name, self.properties)[key]

  def names(self) -> tuple[str, ...]:
    """The registered names, in registration order."""
    return tuple(self._items)

  def __contains__(self, name) -> bool:
    return name in self._items

  def __iter__(self) -> Iterator[str]:
    return iter(self.names())

  def get(self, name: str) -> Callable:
    """The factory registered as ``name``.

    Raises:
      ValueError: naming the setting, the value and the registered names.
    """
    if name not in self._items:
      raise ValueError(f"{self.what}={name!r} is not allowed: choose one of "
                       f"{', '.join(self._items)}")
    return self._items[name]


ALGORITHMS = Registry("algorithm")
CLIENT_OPTIMIZERS = Registry("client_optimizer")
SERVER_OPTIMIZERS = Registry("server_optimizer")
#: quantized: the controller rounds its batches to the kernel's microbatch
#: (so the microbatch is part of its plans, never a layout choice)
CONTROLLERS = Registry("controller", dict(quantized=False))
SCHEDULES = Registry("schedule")
#: needs_deadline: the protocol reads the round's deadline;
#: steps_from_epochs: a client's steps are ``ceil(local_epochs n_k / b_k)``
#: (the run summary's reference steps follow its data)
LOCAL_WORK = Registry("local_work", dict(needs_deadline=False,
                                         steps_from_epochs=False))
#: takes_deadline: the rule's deadline is the ``deadline`` setting
DEADLINE_RULES = Registry("deadline_rule", dict(takes_deadline=False))
ROUND_POLICIES = Registry("round_policy", dict(needs_deadline=False))
#: reads_file: the dataset reads ``data_path``; seeded: its data depend on
#: ``seed`` (a sweep over seeds loads it per seed); auto_model: the model
#: ``model=auto`` gives it (None: cnn for examples of two or more axes, mlp
#: otherwise)
DATASETS = Registry("dataset", dict(reads_file=False, seeded=False,
                                    auto_model=None))
#: natural: its clients are the data's own owners (``client_ids``), so their
#: count is the dataset's and ``num_clients`` is not read
PARTITIONS = Registry("partition", dict(natural=False))
MODELS = Registry("model")
#: reads_file: the profile reads ``trace_path``; tier_table: the tier table
#: (a sequence of dicts with ``name`` and ``speed``, as
#: ``resources.DEFAULT_TIERS``) whose rows its ``ClientResources.tier``
#: indexes under a config, None when its clients are not in tiers (the
#: report then groups them by speed)
RESOURCE_PROFILES = Registry("resources", dict(reads_file=False,
                                               tier_table=None))


def all_registries() -> dict[str, Registry]:
  """Every registry, keyed by the setting it serves."""
  regs = (ALGORITHMS, CLIENT_OPTIMIZERS, SERVER_OPTIMIZERS, CONTROLLERS,
          SCHEDULES, LOCAL_WORK, DEADLINE_RULES, ROUND_POLICIES, DATASETS,
          PARTITIONS, MODELS, RESOURCE_PROFILES)
  return {r.what: r for r in regs}
