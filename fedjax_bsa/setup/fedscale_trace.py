"""Reading FedScale device traces for the ``"trace"`` profile.

:func:`load_trace` parses a FedScale-format device trace (pickle, JSON or
CSV; only plain data is unpickled) into sorted numpy columns;
:func:`fedjax_bsa.setup.resources.make_resources` turns them into client speeds,
bandwidths and availabilities. Re-exported by :mod:`fedjax_bsa.setup.resources`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import pickle
from typing import Mapping

import numpy as np

from fedjax_bsa.setup.client_resources import checked

__all__ = ["load_trace"]


class _SafeUnpickler(pickle.Unpickler):
  """Unpickler that refuses every global except numpy scalar/dtype helpers.

  A FedScale device profile is a dict of dicts of numbers, which needs no
  globals at all (or numpy scalar reconstruction), so anything else is
  rejected rather than executed.
  """
  _ALLOWED = {("numpy.core.multiarray", "scalar"),
              ("numpy._core.multiarray", "scalar"), ("numpy", "dtype")}

  def find_class(self, module, name):
    if (module, name) in self._ALLOWED:
      return super().find_class(module, name)
    raise pickle.UnpicklingError(f"disallowed global {module}.{name}")


def _read_trace_rows(path: str) -> list:
  """Parses a trace file into ``[(client_id, record_dict), ...]``."""
  if not os.path.isfile(path):
    raise ValueError(f"trace file {path!r} does not exist or is not a file.")
  with open(path, "rb") as f:
    raw = f.read()
  ext = os.path.splitext(path)[1].lower()
  readers = {".pkl": ("pickle",), ".pickle": ("pickle",), ".json": ("json",),
             ".csv": ("csv",)}.get(ext, ("pickle", "json", "csv"))
  errors = []
  for kind in readers:
    try:
      if kind == "pickle":
        data = _SafeUnpickler(io.BytesIO(raw)).load()
      elif kind == "json":
        data = json.loads(raw.decode("utf-8"))
      else:
        text = raw.decode("utf-8")
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or "client_id" not in reader.fieldnames:
          raise ValueError("CSV header lacks a 'client_id' column")
        data = list(reader)
    except Exception as e:  # pylint: disable=broad-except
      errors.append(f"{kind}: {type(e).__name__}: {e}")
      continue
    if isinstance(data, Mapping):
      return [(k, v) for k, v in data.items()]
    if isinstance(data, list) and all(isinstance(r, Mapping) for r in data):
      if not all("client_id" in r for r in data):
        errors.append(f"{kind}: a record lacks 'client_id'")
        continue
      return [(r["client_id"], r) for r in data]
    errors.append(f"{kind}: top level is {type(data).__name__}, expected a "
                  "dict {client_id: {...}} or a list of records")
  raise ValueError(f"trace file {path!r} could not be read as a FedScale "
                   f"device trace ({'; '.join(errors)}).")


def load_trace(path: str) -> dict:
  """Reads a FedScale-format device trace.

  Accepted formats (by extension; an unknown extension tries all three):
    * ``.pkl``/``.pickle``: FedScale's pickled dict
      ``{client_id: {"computation": ms_per_sample, "communication": kbps}}``.
      Only plain data is unpickled; arbitrary objects are refused.
    * ``.json``: the same dict (string keys allowed) or a list of records
      with ``client_id``, ``computation``, ``communication``.
    * ``.csv``: header ``client_id,computation,communication``.
  Each client may also carry an ``availability`` in (0, 1].

  Args:
    path: file path.

  Returns:
    Dict of numpy arrays sorted by client id, each ``[R]`` for ``R`` rows:
    ``client_id`` int64, ``computation`` float64 (ms per sample),
    ``communication`` float64 (kbps), ``availability`` float64 (NaN where the
    file has none).

  Raises:
    ValueError: the file is missing, unreadable, empty, or holds a bad value;
      the message names the path.
  """
  path = os.fspath(path)
  rows = _read_trace_rows(path)
  if not rows:
    raise ValueError(f"trace file {path!r} contains no clients.")
  parsed = []
  for cid, rec in rows:
    try:
      if not isinstance(rec, Mapping):
        raise ValueError(f"record is a {type(rec).__name__}, expected a dict")
      av = rec.get("availability")
      parsed.append((
          int(cid),
          checked("computation", float(rec["computation"]), "positive"),
          checked("communication", float(rec["communication"]), "positive"),
          math.nan if av in (None, "") else
          checked("availability", float(av), "probability")))
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(
          f"trace file {path!r}: bad record for client {cid!r} "
          f"({type(e).__name__}: {e}); expected 'computation' (ms/sample, "
          "> 0), 'communication' (kbps, > 0), optional 'availability' in "
          "(0, 1].") from None
  ids = [r[0] for r in parsed]
  if len(set(ids)) != len(ids):
    raise ValueError(f"trace file {path!r} repeats a client_id.")
  parsed.sort(key=lambda r: r[0])
  cols = list(zip(*parsed))
  return {"client_id": np.asarray(cols[0], np.int64),
          "computation": np.asarray(cols[1], np.float64),
          "communication": np.asarray(cols[2], np.float64),
          "availability": np.asarray(cols[3], np.float64)}
