"""The metadata every setting of :class:`~fedjax_bsa.core.config.Config`
carries, and the checks read from it: a field's help, choices, range,
whether it is traced or host-side, and its section; the allowed names of a
choice, the range in words, the type check. An error names the setting, its
value and what is allowed (:class:`ConfigError`). And
:func:`load_config_file`, a settings file read into a mapping.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from fedjax_bsa.core import registry as reg

__all__ = ["ConfigError", "field", "data_field", "fed_field", "plan_field",
           "res_field", "choices", "range_text", "check_type", "TYPE_WORDS",
           "load_config_file", "settings_table", "coerce"]


class ConfigError(ValueError):
  """A setting is unknown or outside its allowed values."""


def field(default, help_: str, *, choices=None, lo=None, hi=None,
           lo_open=False, traced=False, host=False, part=""):
  return dataclasses.field(
      default=default,
      metadata=dict(help=help_, choices=choices, lo=lo, hi=hi,
                    lo_open=lo_open, traced=traced, host=host, part=part))


def data_field(default, help_, **kw):
  return field(default, help_, part="data", **kw)


def fed_field(default, help_, **kw):
  return field(default, help_, part="federated optimisation", **kw)


def plan_field(default, help_, **kw):
  return field(default, help_, part="plans (controller, local work)", **kw)


def res_field(default, help_, **kw):
  return field(default, help_, part="resources and clock", **kw)



def choices(f: dataclasses.Field):
  """The allowed names of a choice field (None for other fields)."""
  c = f.metadata.get("choices")
  if c is None:
    return None
  names = tuple(c.names()) if isinstance(c, reg.Registry) else tuple(c)
  return ("auto",) + names if f.name == "model" else names


def range_text(meta) -> str:
  lo, hi = meta.get("lo"), meta.get("hi")
  if lo is None and hi is None:
    return ""
  left = "(" if meta.get("lo_open") else "["
  return f"{left}{lo if lo is not None else '-inf'}, " \
         f"{hi if hi is not None else 'inf'}]"


TYPE_WORDS = {int: "an integer", float: "a finite number",
              bool: "true or false", str: "a string"}


def check_type(f: dataclasses.Field, value) -> None:
  want = type(f.default)
  ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
  if want is float and isinstance(value, int) and not isinstance(value, bool):
    ok = True
  if want is float and ok and not math.isfinite(value):
    ok = False
  if not ok:
    raise ConfigError(f"{f.name}={value!r} is not allowed: expected "
                      f"{TYPE_WORDS[want]}")


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


_SETTINGS_HEAD = """\
Every setting of `--set key=value` (or of a --config file), by part.
Columns: the setting; its default; `sweep`: what a sweep (`--grid`) may
vary -- `traced`: a value inside the compiled program (varied with no
recompile), `host`: a value the host builds inputs from (data, partition,
devices), `-`: neither (it changes shapes or the program: one value per
sweep); the allowed values (a|b: one of; [lo, hi]: a range, `(` leaving
lo out; blank: any); the meaning."""
_ALLOWED_WIDTH = 34


def _allowed(f: dataclasses.Field) -> list[str]:
  """A setting's allowed values, wrapped at ``|`` into lines of at most
  about ``_ALLOWED_WIDTH`` characters."""
  names = choices(f)
  if names is None:
    return [range_text(f.metadata)]
  lines = [""]
  for i, name in enumerate(names):
    piece = name + ("|" if i < len(names) - 1 else "")
    if lines[-1] and len(lines[-1]) + len(piece) > _ALLOWED_WIDTH:
      lines.append("")
    lines[-1] += piece
  return lines


def settings_table(fields) -> str:
  """The ``fedjax-bsa settings`` listing of ``fields`` (a config's
  dataclass fields): a header explaining the columns, then one aligned row
  per setting (long choice lists wrap in their column), grouped by part."""
  rows, parts = [], []
  for f in fields:
    m = f.metadata
    sweep = "traced" if m["traced"] else ("host" if m["host"] else "-")
    rows.append((f.name, f"{f.default!s}" if f.default != "" else "''",
                 sweep, _allowed(f), m["help"]))
    parts.append(m["part"])
  w_name = max(len(r[0]) for r in rows)
  w_def = max(len(r[1]) for r in rows)
  w_allow = max(len(a) for r in rows for a in r[3])
  fmt = f"{{:<{w_name}}}  {{:<{w_def}}}  {{:<6}}  {{:<{w_allow}}}  {{}}"
  lines = [_SETTINGS_HEAD, "",
           fmt.format("setting", "default", "sweep", "allowed", "meaning")]
  part = None
  for p, (name, default, sweep, allowed, meaning) in zip(parts, rows):
    if p != part:
      part = p
      lines.append(f"# {part}")
    lines.append(fmt.format(name, default, sweep, allowed[0],
                            meaning).rstrip())
    lines += [fmt.format("", "", "", a, "").rstrip() for a in allowed[1:]]
  return "\n".join(lines)


def coerce(fields: dict, name: str, value: Any) -> Any:
  """``value`` (text from ``--set`` or a file, or a Python value) as the
  type of setting ``name`` of ``fields`` (name -> dataclass field)."""
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
                      f"{TYPE_WORDS[want]}") from None
