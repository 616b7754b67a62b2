"""The host loop of one run: compiled chunks, evaluation, files, progress.

Writes, under ``out_dir`` (DESIGN.md section 6): ``config.json`` (first),
``metrics.jsonl`` (one object per evaluated round, flushed as it goes),
``clients.npz`` (per-client plans per round) and ``summary.json`` (last).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_bsa import simulate
from fedjax_bsa.config import Config
from fedjax_bsa.experiment import build

__all__ = ["RunResult", "run", "chunk_records", "format_table"]


class RunResult(NamedTuple):
  records: list          # the metrics.jsonl objects
  summary: dict
  compiles: int          # traces of the chunk function
  clients: dict          # per-client trajectories (numpy)
  state: Any             # final SimState


def _f(x) -> float:
  x = float(x)
  return x if math.isfinite(x) else None


def chunk_records(m: dict, n: int) -> dict:
  """Aggregates the first ``n`` rounds of a chunk's metrics (numpy)."""
  took = m["participants"][:n] > 0
  b_simple = m["noise_scale"][:n][took & (m["noise_scale"][:n] > 0)]
  mins = m["min_batch"][:n][took]
  maxs = m["max_batch"][:n][took]
  return dict(
      train_loss=_f(m["train_loss"][n - 1]),
      mean_batch_size=_f(np.mean(m["mean_batch"][:n][took])) if took.any()
      else None,
      min_batch_size=_f(mins.min()) if mins.size else None,
      max_batch_size=_f(maxs.max()) if maxs.size else None,
      batch_over_memory_cap=int(m["over_cap"][:n].sum()),
      noise_scale=_f(np.median(b_simple)) if b_simple.size else None,
      mean_adascale_gain=_f(np.mean(m["mean_gain"][:n][took]))
      if took.any() else None,
      heterogeneity=_f(np.mean(m["heterogeneity"][:n])),
      round_time_s=_f(m["round_time"][n - 1]),
      participants=int(m["participants"][n - 1]),
      dropped=int(m["dropped"][:n].sum()),
      partial=int(m["partial"][:n].sum()),
      examples=int(m["examples"][:n].sum()),
      padding_efficiency=_f(np.mean(m["padding_efficiency"][:n][took]))
      if took.any() else None)


def format_table(records: list, summary: dict) -> str:
  """A short text table of the evaluated rounds (at most ~12 rows)."""
  cols = [("round", "{:>6}"), ("sim_time_s", "{:>10.1f}"),
          ("wall_time_s", "{:>8.1f}"), ("test_accuracy", "{:>8.4f}"),
          ("test_loss", "{:>8.4f}"), ("mean_batch_size", "{:>7.1f}"),
          ("noise_scale", "{:>9.2f}")]
  head = ["round", "sim_s", "wall_s", "test_acc", "test_loss", "batch",
          "B_simple"]
  widths = [6, 10, 8, 8, 8, 7, 9]
  lines = [" ".join(h.rjust(w) for h, w in zip(head, widths))]
  step = max(1, math.ceil(len(records) / 12))
  rows = records[::step]
  if records and rows[-1] is not records[-1]:
    rows.append(records[-1])
  for r in rows:
    cells = []
    for (key, fmt), w in zip(cols, widths):
      v = r.get(key)
      cells.append(fmt.format(v) if v is not None else "-".rjust(w))
    lines.append(" ".join(cells))
  lines.append(
      f"final test accuracy {summary['final_test_accuracy']:.4f}, best "
      f"{summary['best_test_accuracy']:.4f}, simulated "
      f"{summary['sim_time_s']:.1f} s, wall {summary['wall_time_s']:.1f} s, "
      f"{summary['compiles']} compile(s) of the round loop")
  return "\n".join(lines)


def run(cfg: Config, out_dir: str | None = None, *,
        print_table: bool = True, stream=None) -> RunResult:
  """Runs one simulation end to end.

  Args:
    cfg: the settings (validated here).
    out_dir: where to write the outputs (None: write nothing).
    print_table: print the final table to ``stream``.
    stream: text stream for messages (default ``sys.stdout``).

  Returns:
    A :class:`RunResult`.
  """
  stream = stream or sys.stdout
  start = time.perf_counter()
  cfg = cfg.validate()
  exp = build(cfg)
  sim = simulate.make_simulation(exp)
  data = jax.device_put(exp.data)
  res = jax.device_put(exp.resources)
  hp = simulate.hparams_of(cfg)
  x_test = jnp.asarray(exp.dataset.x_test)
  y_test = jnp.asarray(exp.dataset.y_test)
  state = jax.jit(sim.init)(jax.random.key(cfg.seed), data, res, hp)
  run_chunk = jax.jit(sim.run_chunk)
  evaluate = jax.jit(sim.evaluate)

  metrics_file = None
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as fh:
      json.dump(cfg.to_dict(), fh, indent=1)
    metrics_file = open(os.path.join(out_dir, "metrics.jsonl"), "w")

  records = []

  def record(done, extra):
    acc, loss = evaluate(state.params, x_test, y_test)
    r = dict(round=done, sim_time_s=_f(state.sim_time),
             wall_time_s=time.perf_counter() - start,
             test_accuracy=_f(acc), test_loss=_f(loss), **extra)
    records.append(r)
    if metrics_file:
      metrics_file.write(json.dumps(r) + "\n")
      metrics_file.flush()

  empty = dict(train_loss=None, mean_batch_size=None, min_batch_size=None,
               max_batch_size=None, noise_scale=None)
  record(0, empty)
  bar = None
  if cfg.progress:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=cfg.rounds, desc="rounds", unit="round", file=sys.stderr,
               leave=False)
  per_client = {k: [] for k in ("cohort", "batch", "steps", "lr",
                                "b_simple")}
  done, diverged = 0, None
  while done < cfg.rounds:
    left = cfg.rounds - done
    state, m = run_chunk(state, data, res, hp, jnp.int32(left))
    m = jax.tree.map(np.asarray, m._asdict())
    n = min(sim.chunk, left)
    for k in per_client:
      per_client[k].append(m[k][:n])
    bad = ~np.isfinite(m["train_loss"][:n])
    done += n
    if bar is not None:
      bar.update(n)
      bar.set_postfix(loss=f"{m['train_loss'][n - 1]:.3f}")
    if bad.any():
      diverged = done - n + int(np.argmax(bad)) + 1
      record(done, chunk_records(m, n))
      print(f"diverged: the training loss became non-finite at round "
            f"{diverged}; stopped after round {done}, keeping the "
            f"{len(records)} records written", file=sys.stderr)
      break
    record(done, chunk_records(m, n))
  if bar is not None:
    bar.close()

  clients = {k: np.concatenate(v) if v else np.zeros((0,))
             for k, v in per_client.items()}
  clients["round"] = np.arange(1, len(clients["cohort"]) + 1)
  accs = [r["test_accuracy"] for r in records if r["test_accuracy"] is not None]
  batches = [r["mean_batch_size"] for r in records[1:]
             if r["mean_batch_size"] is not None]
  summary = dict(
      rounds=done, diverged_round=diverged,
      final_test_accuracy=records[-1]["test_accuracy"] or 0.0,
      best_test_accuracy=max(accs) if accs else 0.0,
      final_test_loss=records[-1]["test_loss"],
      sim_time_s=records[-1]["sim_time_s"],
      wall_time_s=time.perf_counter() - start,
      compiles=len(sim.traces), num_clients=int(exp.data.y.shape[0]),
      lanes=exp.lanes,
      mean_batch_size=float(np.mean(batches)) if batches else None,
      devices=[str(d) for d in jax.devices()])
  if out_dir:
    metrics_file.close()
    np.savez(os.path.join(out_dir, "clients.npz"), **clients)
    with open(os.path.join(out_dir, "summary.json"), "w") as fh:
      json.dump(summary, fh, indent=1)
  if print_table:
    print(format_table(records, summary), file=stream)
  return RunResult(records, summary, len(sim.traces), clients, state)
