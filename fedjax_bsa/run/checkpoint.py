"""Checkpoints between chunks of rounds, with orbax, verified on restore.

Layout under a directory ``D`` (one per run or sweep)::

  D/<step>/             orbax checkpoint of the simulation state (the device
                        pytree; PRNG keys stored as their raw key data)
  D/<step>/host.npz     host-side arrays (per-client histories so far)
  D/<step>/COMMIT.json  written last, atomically: the step, host metadata
                        (records so far, ...) and a SHA-256 of every file

Orbax writes each step into a temporary folder and renames it when complete;
``COMMIT.json`` is written (to a temporary name, then renamed) only after
that, so a step folder without a valid ``COMMIT.json``, or whose files no
longer match their checksums, is incomplete or corrupt: :meth:`restore`
warns and falls back to the previous step. The newest ``keep`` committed
steps are kept.

Every process of a multi-process job calls :meth:`save` and :meth:`restore`
(orbax coordinates them); only process 0 writes ``host.npz`` and
``COMMIT.json`` and deletes old steps.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from fedjax_bsa.run import distributed

__all__ = ["Checkpointer", "Restored", "keys_to_data", "data_to_keys"]

COMMIT = "COMMIT.json"
HOST = "host.npz"


def _is_key(a) -> bool:
  return isinstance(a, jax.Array) and jax.dtypes.issubdtype(
      a.dtype, jax.dtypes.prng_key)


def keys_to_data(tree):
  """Replaces typed PRNG keys by their ``uint32`` key data (for saving)."""
  return jax.tree.map(lambda a: jax.random.key_data(a) if _is_key(a) else a,
                      tree)


def data_to_keys(tree, template):
  """Inverse of :func:`keys_to_data`: wraps key data where ``template``
  holds keys (same structure), with the template's PRNG implementation."""
  return jax.tree.map(
      lambda a, t: jax.random.wrap_key_data(a, impl=jax.random.key_impl(t))
      if _is_key(t) else a, tree, template)


class Restored(NamedTuple):
  step: int       # rounds done at the checkpoint
  state: Any      # the device pytree, shaped and sharded like the template
  meta: dict      # the host metadata given to save
  host: dict      # the host arrays given to save (numpy)


def _checksums(folder: str) -> dict:
  out = {}
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, folder)
      if rel == COMMIT:
        continue
      h = hashlib.sha256()
      with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
          h.update(block)
      out[rel] = h.hexdigest()
  return out


def _warn(msg: str) -> None:
  print(f"fedjax-bsa: warning: {msg}", file=sys.stderr)


class Checkpointer:
  """Saves and restores ``(state, meta, host arrays)`` by step.

  Args:
    directory: where the step folders live (created if missing).
    keep: committed steps kept (older ones are deleted after each save).
  """

  def __init__(self, directory: str, keep: int = 2):
    if keep < 1:
      raise ValueError(f"keep={keep} is out of range: must be >= 1")
    self.directory = os.path.abspath(directory)
    self.keep = keep
    self._ckpt = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    if distributed.is_main():
      os.makedirs(self.directory, exist_ok=True)
    distributed.sync("fedjax_bsa_ckpt_dir")

  def _path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def steps(self) -> list[int]:
    """Step folders present (committed or not), newest first."""
    if not os.path.isdir(self.directory):
      return []
    return sorted((int(n) for n in os.listdir(self.directory) if n.isdigit()),
                  reverse=True)

  def _check(self, step: int) -> dict:
    """The commit metadata of ``step``; raises ``ValueError`` if invalid."""
    path = os.path.join(self._path(step), COMMIT)
    try:
      with open(path) as fh:
        commit = json.load(fh)
    except FileNotFoundError:
      raise ValueError("no COMMIT.json (the save did not complete)") from None
    except (OSError, ValueError) as e:
      raise ValueError(f"unreadable COMMIT.json ({e})") from None
    if commit.get("step") != step:
      raise ValueError(f"COMMIT.json names step {commit.get('step')}")
    found = _checksums(self._path(step))
    want = commit.get("files", {})
    bad = sorted(set(want) ^ set(found) |
                 {f for f in want if found.get(f) != want[f]})
    if bad:
      raise ValueError(f"files missing, extra or changed: {', '.join(bad[:3])}"
                       + (" ..." if len(bad) > 3 else ""))
    return commit

  def save(self, step: int, state, meta: dict, host: dict | None = None
           ) -> None:
    """Writes checkpoint ``step`` (every process calls this).

    Args:
      step: rounds done (the folder name).
      state: pytree of ``jax.Array`` (may be sharded over processes; PRNG
        keys allowed).
      meta: JSON-serializable host metadata.
      host: numpy arrays written by process 0 to ``host.npz``.
    """
    path = self._path(step)
    if distributed.is_main() and os.path.exists(path):
      shutil.rmtree(path)  # a stale, uncommitted folder of a killed run
    distributed.sync(f"fedjax_bsa_ckpt_pre_{step}")
    self._ckpt.save(path, args=ocp.args.StandardSave(keys_to_data(state)))
    if distributed.is_main():
      np.savez(os.path.join(path, HOST), **(host or {}))
      commit = dict(step=step, meta=meta, files=_checksums(path))
      tmp = os.path.join(path, COMMIT + ".tmp")
      with open(tmp, "w") as fh:
        json.dump(commit, fh)
        fh.flush()
        os.fsync(fh.fileno())
      os.replace(tmp, os.path.join(path, COMMIT))
      self._prune(step)
    distributed.sync(f"fedjax_bsa_ckpt_post_{step}")

  def _prune(self, newest: int) -> None:
    kept = 0
    for step in self.steps():
      if step > newest:
        continue
      ok = os.path.exists(os.path.join(self._path(step), COMMIT))
      if ok and kept < self.keep:
        kept += 1
        continue
      shutil.rmtree(self._path(step), ignore_errors=True)
    self._remove_temporaries()

  def _remove_temporaries(self) -> None:
    """Deletes orbax's temporary folders (a save cut short) (process 0)."""
    if not (distributed.is_main() and os.path.isdir(self.directory)):
      return
    for name in os.listdir(self.directory):
      if ".orbax-checkpoint-tmp" in name:
        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

  def restore(self, template) -> Restored | None:
    """The newest valid checkpoint, or None if there is none.

    Invalid (partial or corrupt) newer steps are reported with a warning,
    skipped, and deleted (by process 0) so that the run can write them
    again; orbax's temporary folders of a save cut short are deleted first.

    Args:
      template: a pytree shaped, typed and sharded like the saved state
        (e.g. the freshly initialized state); arrays are restored onto its
        shardings.

    Returns:
      A :class:`Restored`, or None when no step is valid.
    """
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
        keys_to_data(template))
    self._remove_temporaries()
    distributed.sync("fedjax_bsa_ckpt_tmp_removed")
    found = None
    bad = []
    for step in self.steps():
      try:
        commit = self._check(step)
        state = self._ckpt.restore(self._path(step),
                                   args=ocp.args.StandardRestore(abstract))
        with np.load(os.path.join(self._path(step), HOST)) as z:
          host = {k: z[k] for k in z.files}
      except Exception as e:  # pylint: disable=broad-except
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        _warn(f"checkpoint {self._path(step)} is incomplete or corrupt "
              f"({why}); trying the previous one")
        bad.append(step)
        continue
      found = Restored(step, data_to_keys(state, template), commit["meta"],
                       host)
      break
    distributed.sync("fedjax_bsa_ckpt_restored")
    if distributed.is_main():
      for step in bad:
        shutil.rmtree(self._path(step), ignore_errors=True)
    return found
