"""Which regime a configuration is in: compute against communication, and
how much the batch lever can gain at most (headroom).

Printed in every run's summary (``compute_comm_ratio``, ``headroom``) and
used by the regime study, so that a result of 1.0x in a cell with no
headroom reads as what it is.
"""

from __future__ import annotations

import numpy as np

from fedjax_bsa import clock

__all__ = ["describe", "compute_comm_ratio"]


def compute_comm_ratio(res, batch, steps, model_bytes: int) -> float:
  """Median over clients of local compute time / communication time."""
  comp = np.asarray(clock.local_time(res, batch, steps))
  comm = np.asarray(clock.comm_time(res, model_bytes))
  return float(np.median(comp / np.maximum(comm, 1e-12)))


def describe(exp, records) -> dict:
  """The regime of an experiment, for its summary."""
  cfg = exp.cfg
  sizes = np.array([len(p) for p in exp.parts], np.float32)
  b = float(cfg.batch_size)
  if cfg.local_work == "epochs":
    steps = np.ceil(cfg.local_epochs * sizes / b)
  else:
    steps = np.full_like(sizes, cfg.local_steps)
  return dict(compute_comm_ratio=compute_comm_ratio(
      exp.resources, b, steps, exp.model_bytes))
