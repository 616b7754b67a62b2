"""The view of a config that compiled code gets: its static settings only.

A sweep compiles one program for ``E`` experiments whose traced settings
(:data:`~fedjax_bsa.core.config.TRACED`) differ; inside it they are arrays
(``hparams[name]``, ``[E]`` before the experiments' ``vmap``). A factory
that read a traced setting from the config instead would bake experiment
0's value into every experiment, silently. :func:`static_view` wraps the
config so that such a read is an error naming the setting and where to
read it.
"""

from __future__ import annotations

from typing import Any

from fedjax_bsa.core.config import Config
from fedjax_bsa.core.config import ConfigError
from fedjax_bsa.core.config import TRACED

__all__ = ["StaticConfig", "TracedSettingError", "static_view"]

_TRACED = frozenset(TRACED)


class TracedSettingError(ConfigError):
  """A traced setting was read from the static view of a config."""


class StaticConfig:
  """A read-only view of a :class:`~fedjax_bsa.core.config.Config` that
  refuses its traced settings.

  >>> from fedjax_bsa import Config
  >>> view = static_view(Config(client_lr=0.3))
  >>> view.controller, view.clients_per_round
  ('displacement', 10)
  >>> view.client_lr
  Traceback (most recent call last):
  ...
  fedjax_bsa.core.static.TracedSettingError: client_lr is a traced setting: a sweep's experiments differ in it, so compiled code reads hparams['client_lr'], not the config
  """

  __slots__ = ("_cfg",)

  def __init__(self, cfg: Config):
    object.__setattr__(self, "_cfg", cfg)

  def __getattr__(self, name: str) -> Any:
    if name in _TRACED:
      raise TracedSettingError(
          f"{name} is a traced setting: a sweep's experiments differ in it, "
          f"so compiled code reads hparams[{name!r}], not the config")
    return getattr(object.__getattribute__(self, "_cfg"), name)

  def __setattr__(self, name, value):
    raise AttributeError("the static view of a config is read-only")

  def __repr__(self) -> str:
    return f"StaticConfig({object.__getattribute__(self, '_cfg')!r})"


def static_view(cfg: Config | StaticConfig) -> StaticConfig:
  """``cfg`` without its traced settings (idempotent)."""
  return cfg if isinstance(cfg, StaticConfig) else StaticConfig(cfg)
