"""The kernel's layout chosen by measurement (``layout=measure``, the default).

How many lanes ``L`` run at once and how many microbatches ``R`` of ``mu``
rows a lane computes per loop iteration change how fast a round runs, not
what it computes (beyond the order of float sums), and the fastest choice
depends on the machine, the model and the plan mix in ways a fixed rule
gets wrong. So a
run or sweep, before it compiles its round loop, times a few candidates
(:func:`fedjax_bsa.kernel.layout.candidates`) on its own model, algorithm and a
round of its first plan (the user's ``(b_0, eta_0)`` and local work on a
cohort of its clients), each compiled once and timed round-robin, and keeps
the fastest. The choice is cached per machine, model and mix in a JSON file
(``$FEDJAX_BSA_CACHE_DIR``, else ``$XDG_CACHE_HOME/fedjax_bsa``, else
``~/.cache/fedjax_bsa``), so it is measured once.

What is never searched: a setting given explicitly (``lanes``,
``microbatch``, ``per_slot`` > 0 win); the microbatch with noise statistics
on (the microbatches are the estimator's samples: another ``mu`` gives other,
equally valid estimates, and so other plans) or for a controller that
quantizes its batches to it (``noise_scale``, ``goodput``); a layout over a
mesh (the rule of :func:`fedjax_bsa.kernel.layout.choose`). Lanes and slot width
change only the order of float sums.

``FEDJAX_BSA_LAYOUT=rule`` in the environment makes ``layout=measure`` use
the rule instead (the test suite sets it, so that its runs never depend on
timing).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import tempfile
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_bsa import kernel as kernel_lib
from fedjax_bsa import plans
from fedjax_bsa.core import config as config_lib
from fedjax_bsa.data import federated
from fedjax_bsa.kernel import layout as layout_lib
from fedjax_bsa.report import regime
from fedjax_bsa.setup import models

__all__ = ["KernelLayout", "choose_layout", "candidates_for", "search",
           "describe", "cache_path", "cpu_model", "machine_key",
           "ENV_CACHE", "ENV_LAYOUT"]

ENV_CACHE = "FEDJAX_BSA_CACHE_DIR"
ENV_LAYOUT = "FEDJAX_BSA_LAYOUT"
_REPS = 3


class KernelLayout(NamedTuple):
  """A kernel layout and how it was chosen."""
  lanes: int
  microbatch: int
  per_slot: int
  how: str                   # "set", "rule", "measured" or "cached"
  timings: tuple = ()        # ((lanes, mu, R, median round s), ...)
  note: str = ""             # why the candidates were not all timed

  def summary(self) -> dict:
    """The layout as the run summary records it."""
    out = dict(lanes=self.lanes, microbatch=self.microbatch,
               per_slot=self.per_slot, how=self.how)
    if self.note:
      out["note"] = self.note
    if self.timings:
      out["candidates"] = [dict(lanes=l, microbatch=m, per_slot=r,
                                round_s=t) for l, m, r, t in self.timings]
    return out

  def describe(self) -> str:
    """One line for a run's log."""
    what = f"L{self.lanes} mu{self.microbatch} R{self.per_slot}"
    if self.how == "measured":
      return (f"kernel layout {what}, the fastest of {len(self.timings)} "
              f"timed ({describe(self.timings)}); cached in {cache_path()}")
    return f"kernel layout {what} ({self.how})"


def describe(timings) -> str:
  """``"L16 mu5 R2 241 ms, ..."``: candidates and their round times."""
  return ", ".join(f"L{l} mu{m} R{r} {t * 1e3:.0f} ms"
                   for l, m, r, t in timings)


def cpu_model() -> str | None:
  """The host CPU's model name from ``/proc/cpuinfo`` (None where unknown)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return None


def machine_key() -> str:
  """What a measured layout depends on besides the work: the backend, its
  device kind and count, the host CPU and its cores, and jax's version."""
  dev = jax.devices()[0]
  return (f"{jax.default_backend()}|{dev.device_kind}|{jax.device_count()}"
          f"|{cpu_model() or platform.processor()}|{os.cpu_count()}"
          f"|jax {jax.__version__}")


def cache_path() -> str:
  """The JSON file of measured layouts."""
  root = os.environ.get(ENV_CACHE) or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.join(
          os.path.expanduser("~"), ".cache"), "fedjax_bsa")
  return os.path.join(root, "layouts.json")


def _read_cache() -> dict:
  try:
    with open(cache_path()) as f:
      data = json.load(f)
    return data if isinstance(data, dict) else {}
  except (OSError, ValueError):
    return {}


def _write_cache(key: str, entry: dict, log: Callable) -> None:
  """Adds ``entry`` under ``key`` (atomically; a cache that cannot be
  written is reported and skipped: the run goes on)."""
  path = cache_path()
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = _read_cache()
    data[key] = entry
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
      json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
  except OSError as e:
    log(f"note: the measured layout was not cached ({e})")


def _probe(exp, E: int, K: int):
  """A round of the first plan: ``(server params [E, ...], data, jobs,
  client inputs [E K, ...] or None)`` on a seeded cohort of experiment
  0's clients (the same cohort for every experiment)."""
  cfg = exp.cfg
  N = exp.num_clients
  cohort = np.sort(np.random.default_rng(0).choice(N, K, replace=False))
  data = federated.from_partition(exp.dataset.x_train, exp.dataset.y_train,
                                  [exp.parts[c] for c in cohort])
  params = exp.model.init(jax.random.key(0))
  server = jax.tree.map(lambda a: jnp.broadcast_to(a, (E,) + a.shape),
                        params)
  hp = config_lib.hparams(cfg)
  alg = exp.algorithm
  cin = alg.client_inputs(alg.init(params, N), jnp.asarray(cohort), hp)
  cin = jax.tree.map(lambda a: jnp.tile(a, (E,) + (1,) * (a.ndim - 1)), cin)
  sizes = np.array([len(exp.parts[c]) for c in cohort], np.int32)
  local = np.tile(np.arange(K, dtype=np.int32), E)
  jobs = kernel_lib.Jobs(
      jnp.asarray(local), jnp.repeat(jnp.arange(E, dtype=jnp.int32), K),
      jnp.full((E * K,), int(cfg.batch_size), jnp.int32),
      jnp.asarray(np.tile(regime.reference_steps(cfg, sizes).astype(
          np.int32), E)),
      jnp.full((E * K,), cfg.client_lr, jnp.float32),
      jnp.full((E * K,), 1.0 / K, jnp.float32),
      federated.shuffle_seeds(jax.random.key(1), jnp.asarray(local)))
  return server, jax.device_put(data), jobs, cin


def _work_key(exp, E: int, K: int, fixed: tuple) -> str:
  cfg = exp.cfg
  # shapes only: no initialisation on every run's start
  params = jax.eval_shape(exp.model.init, jax.random.key(0))
  shapes = [tuple(a.shape) for a in jax.tree.leaves(params)]
  sizes = sorted(len(p) for p in exp.parts)
  desc = dict(model=cfg.model, shapes=shapes,
              input=list(exp.dataset.x_train.shape[1:]),
              algorithm=cfg.algorithm, deltas=exp.algorithm.client_deltas,
              E=E, K=K, b0=cfg.batch_size, work=cfg.local_work,
              steps=cfg.local_steps, epochs=cfg.local_epochs,
              rows=[sizes[0], sizes[len(sizes) // 2], sizes[-1]],
              noise=cfg.noise_stats, fixed=list(fixed))
  text = json.dumps(desc, sort_keys=True, default=str)
  return machine_key() + "|" + hashlib.sha256(text.encode()).hexdigest()[:16]


def search(build: Callable, args: tuple, cands: list, *,
           rounds: int | None = None, log: Callable = print):
  """Times the layouts ``cands`` (the rule's first) on one round.

  Args:
    build: ``build(lanes, mu, R) -> fn(*args)``, the round kernel at a
      layout (not jitted).
    args: its arguments (one round).
    cands: ``[(lanes, mu, R), ...]``, the rule's layout first.
    rounds: rounds the run will take; when half of their time at the rule's
      layout is less than compiling the other candidates would cost, the
      rule is kept without measuring them (None: always measure).
    log: progress lines.

  Returns:
    ``(index of the fastest, ((lanes, mu, R, median s), ...), note)``;
    ``note`` says why the others were not timed ("" when they were).
  """
  def compiled(c):
    t0 = time.perf_counter()
    fn = jax.jit(build(*c)).lower(*args).compile()
    jax.block_until_ready(fn(*args))
    return fn, time.perf_counter() - t0

  def once(fn):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0

  fn0, c0 = compiled(cands[0])
  t0 = float(np.median([once(fn0) for _ in range(_REPS)]))
  if rounds is not None and 0.5 * t0 * rounds < c0 * (len(cands) - 1):
    return 0, ((*cands[0], t0),), (
        f"not measured: {rounds} rounds of {t0 * 1e3:.0f} ms could save "
        f"less than compiling {len(cands) - 1} more layouts costs "
        f"(~{c0 * (len(cands) - 1):.0f} s)")
  log(f"timing {len(cands)} kernel layouts on this model and mix "
      f"(once per machine, model and mix; ~{c0 * len(cands):.0f} s) ...")
  fns = [fn0] + [compiled(c)[0] for c in cands[1:]]
  times = [[] for _ in cands]
  for _ in range(_REPS):       # round-robin: machine noise hits all alike
    for i, fn in enumerate(fns):
      times[i].append(once(fn))
  med = [float(np.median(t)) for t in times]
  return int(np.argmin(med)), tuple((*c, m) for c, m in zip(cands, med)), ""


def candidates_for(cfg, jobs: int, lanes: int = 0) -> list:
  """The layouts a run of ``cfg`` with ``jobs`` client jobs a round times
  (:func:`fedjax_bsa.kernel.layout.candidates` with its settings; a controller
  that quantizes its batches keeps the rule's microbatch)."""
  quantized = plans.quantized(cfg)
  return layout_lib.candidates(
      jax.default_backend(), jobs, cfg.batch_size, cfg.noise_stats,
      lanes=int(lanes or cfg.lanes),
      microbatch=int(cfg.microbatch) or (
          cfg.kernel_microbatch if quantized else 0),
      per_slot=int(cfg.per_slot))


def choose_layout(exp, E: int, K: int, *, lanes: int = 0, mesh: Any = None,
                  log: Callable = print) -> KernelLayout:
  """The kernel layout of a run (``E = 1``) or sweep of ``E`` experiments
  with ``K`` clients a round each.

  Settings ``lanes`` (or the ``lanes`` argument), ``microbatch`` and
  ``per_slot`` above 0 are kept; the rest come from the cache, a
  measurement (``layout=measure``, one device) or the rule of
  :func:`fedjax_bsa.kernel.layout.choose` (``layout=rule``, a mesh, or
  ``FEDJAX_BSA_LAYOUT=rule``).
  """
  cfg = exp.cfg
  fixed = (int(lanes or cfg.lanes), int(cfg.microbatch), int(cfg.per_slot))
  mu_rule = cfg.kernel_microbatch
  auto = layout_lib.choose(jax.default_backend(), E * K, mu_rule,
                           cfg.batch_size)
  rule = KernelLayout(fixed[0] or auto.lanes, mu_rule,
                      fixed[2] or auto.per_slot, "rule")
  if all(fixed):
    return rule._replace(how="set")
  if (cfg.layout == "rule" or mesh is not None
      or os.environ.get(ENV_LAYOUT) == "rule"):
    return rule
  cands = candidates_for(cfg, E * K, lanes)
  if len(cands) == 1:
    return KernelLayout(*cands[0], how="rule")
  key = _work_key(exp, E, K, fixed)
  hit = _read_cache().get(key)
  if (hit and tuple(hit.get("layout", ())) in cands
      and not (hit.get("note") and hit.get("rounds", 0) < cfg.rounds)):
    return KernelLayout(*hit["layout"], how="cached",
                        timings=tuple(tuple(t) for t in hit["timings"]),
                        note=hit.get("note", ""))
  args = _probe(exp, E, K)
  loss = functools.partial(models.example_losses, exp.model.apply)
  alg = exp.algorithm

  def build(lanes, mu, per_slot):
    return kernel_lib.make_round_kernel(
        loss, alg.client_tx, alg.client_init, microbatch=mu, lanes=lanes,
        per_slot=per_slot, num_experiments=E, noise_stats=cfg.noise_stats,
        client_deltas=alg.client_deltas)

  t0 = time.perf_counter()
  best, timings, note = search(build, args, cands, rounds=cfg.rounds,
                               log=log)
  _write_cache(key, dict(layout=list(cands[best]),
                         timings=[list(t) for t in timings], note=note,
                         rounds=cfg.rounds,
                         seconds=time.perf_counter() - t0,
                         when=time.strftime("%Y-%m-%dT%H:%M:%S")), log)
  if note:
    return KernelLayout(*cands[best], how="rule", timings=timings,
                        note=note)
  lay = KernelLayout(*cands[best], how="measured", timings=timings)
  log(lay.describe())
  return lay
