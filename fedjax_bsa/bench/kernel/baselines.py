"""What the round kernel is timed against, and how each is built.

* :func:`kernel_fn`: the kernel itself (FedAvg with client SGD), for one
  experiment, unjitted (the caller compiles it).
* :func:`padded_fn`: :func:`fedjax_bsa.kernel.reference.make_padded_kernel` with
  the kernel's call signature.
* :class:`NaiveLoop`: a per-client Python loop with exact shapes, one
  jitted SGD step per distinct batch size (stronger than
  :func:`fedjax_bsa.kernel.reference.reference_round`, which also computes the
  noise statistics on the host).
* :func:`run_fedjax`: the uniform mix through FedJAX 0.0.17 in its own
  virtualenv: the repository's ``benchmarks/fedjax_uniform.py`` (which
  imports FedJAX and Haiku, so it is not installed with the package) run
  as a subprocess, found by :func:`fedjax_script`.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_bsa import algorithms
from fedjax_bsa import kernel as kernel_lib
from fedjax_bsa.core.config import Config
from fedjax_bsa.data import federated
from fedjax_bsa.kernel import reference
from fedjax_bsa.setup import models

__all__ = ["loss_of", "fedavg", "kernel_fn", "padded_fn", "ceiling_fn",
           "gather_batches", "NaiveLoop", "fedjax_script", "run_fedjax",
           "FEDJAX_INSTALL", "DEFAULT_FEDJAX_PYTHON", "FEDJAX_SCRIPT"]

tmap = jax.tree.map

FEDJAX_INSTALL = (
    'python3 -m venv /tmp/fjvenv && /tmp/fjvenv/bin/pip install '
    'fedjax==0.0.17 "jax[cpu]==0.4.30" jaxlib==0.4.30 dm-haiku==0.0.12 '
    'optax==0.2.2 chex==0.1.86 "numpy<2" "scipy<1.13"')
DEFAULT_FEDJAX_PYTHON = "/tmp/fjvenv/bin/python"
#: The FedJAX runner, relative to the repository's root.
FEDJAX_SCRIPT = os.path.join("benchmarks", "fedjax_uniform.py")


def loss_of(model: models.Model):
  """``(params, x[B, ...], y[B]) -> [B]`` per-example losses of ``model``."""
  return functools.partial(models.example_losses, model.apply)


@functools.lru_cache(maxsize=None)
def fedavg() -> algorithms.Algorithm:
  """FedAvg with plain client SGD (the benchmarks' algorithm)."""
  return algorithms.make_algorithm(Config(algorithm="fedavg",
                                          client_optimizer="sgd"))


def kernel_fn(model: models.Model, *, microbatch: int, lanes: int,
              noise_stats: bool = False, mesh=None, per_slot: int = 1):
  """``fn(params[1, ...], data, jobs) -> RoundOutput``: the round kernel
  of one experiment (FedAvg, client SGD), not jitted."""
  alg = fedavg()
  kern = kernel_lib.make_round_kernel(
      loss_of(model), alg.client_tx, alg.client_init, microbatch=microbatch,
      lanes=lanes, per_slot=per_slot, num_experiments=1,
      noise_stats=noise_stats, mesh=mesh)
  return lambda params, data, jobs: kern(params, data, jobs, None)


def padded_fn(model: models.Model, s_max: int, b_max: int):
  """``fn(params[1, ...], data, jobs) -> delta``: the padded
  ``[K, s_max, b_max]`` layout, not jitted."""
  padded = reference.make_padded_kernel(loss_of(model), s_max, b_max)
  return lambda params, data, jobs: padded(tmap(lambda a: a[0], params),
                                           data, jobs)


def gather_batches(data, jobs, steps: int, batch: int):
  """Every job's ``steps`` minibatches of ``batch`` rows, gathered once:
  ``(x [J, steps, batch, ...], y [J, steps, batch])`` (the rows the kernel
  reads; every job must have this batch and at least this many steps)."""
  def one(c, seed):
    n = jnp.maximum(data.num_examples[c], 1)
    pos = (jnp.arange(steps)[:, None] * batch
           + jnp.arange(batch)[None, :]) % n
    rows = federated.example_rows(data, c, seed, pos.reshape(-1))
    rows = rows.reshape(steps, batch)
    return data.x[rows], data.y[rows]
  return jax.jit(jax.vmap(one))(jobs.client, jobs.seed)


def ceiling_fn(model: models.Model):
  """``fn(params, xs, ys, lr, weight) -> delta``: FedAvg with client SGD as
  a plain ``vmap`` over clients of a ``lax.scan`` over pre-gathered equal
  minibatches (:func:`gather_batches`), no masks, no statistics: the least
  work a round of equal clients can be on this design, not jitted."""
  loss_fn = loss_of(model)

  def fn(params, xs, ys, lr, weight):
    def client(x, y, lr_k, w_k):
      def step(w, xy):
        g = jax.grad(lambda p: jnp.mean(loss_fn(p, *xy)))(w)
        return tmap(lambda a, gi: a - lr_k * gi, w, g), None
      w, _ = jax.lax.scan(step, params, (x, y))
      return tmap(lambda a, p0: w_k * (a - p0), w, params)
    d = jax.vmap(client)(xs, ys, lr, weight)
    return tmap(lambda a: a.sum(0), d)
  return fn


class NaiveLoop:
  """A per-client Python loop with exact shapes (the naive baseline).

  Job ``k`` runs ``s_k`` calls of a jitted SGD step of batch ``b_k`` (one
  compile per distinct batch size), reading the rows the kernel reads
  (:func:`fedjax_bsa.data.federated.example_rows`); a jitted weighted add
  aggregates ``c_k (x_k - x)``.
  """

  def __init__(self, model: models.Model):
    loss_fn = loss_of(model)

    @functools.partial(jax.jit, static_argnums=0)
    def step(b, w, data, client, seed, t, lr):
      rows = federated.example_rows(data, client, seed,
                                    t * b + jnp.arange(b, dtype=jnp.int32))
      g = jax.grad(lambda p: jnp.mean(loss_fn(p, data.x[rows],
                                              data.y[rows])))(w)
      return tmap(lambda a, gi: a - lr * gi, w, g)

    @jax.jit
    def accumulate(agg, w, w0, c):
      return tmap(lambda a, x, y: a + c * (x - y), agg, w, w0)

    self.step, self.accumulate = step, accumulate

  def __call__(self, params, data, jobs: kernel_lib.Jobs, only=None):
    """One round: ``params`` one experiment's tree; ``jobs`` of that
    experiment; ``only``: the job indices to run (default all)."""
    host = tmap(np.asarray, jobs)
    agg = tmap(jnp.zeros_like, params)
    for k in range(len(host.client)) if only is None else only:
      b, w = int(host.batch[k]), params
      cid, seed = np.int32(host.client[k]), host.seed[k]
      lr = np.float32(host.lr[k])
      for t in range(int(host.steps[k])):
        w = self.step(b, w, data, cid, seed, np.int32(t), lr)
      agg = self.accumulate(agg, w, params, np.float32(host.weight[k]))
    return agg

  def step_compiled(self, params, data, b: int):
    """The compiled step at batch ``b`` (for its memory analysis)."""
    return self.step.lower(b, params, data, np.int32(0), np.uint32(0),
                           np.int32(0), np.float32(0.1)).compile()


def _client_arrays(data: federated.FederatedData, clients):
  """``x[K, n, ...]``, ``y[K, n]`` of equally sized clients (host)."""
  x, y = np.asarray(data.x), np.asarray(data.y)
  rows = [federated.client_rows(data, int(k)) for k in clients]
  if len({len(r) for r in rows}) != 1:
    raise ValueError("FedJAX's runner needs clients of one size, got "
                     f"{sorted({len(r) for r in rows})}")
  return np.stack([x[r] for r in rows]), np.stack([y[r] for r in rows])


def fedjax_script(path: str | None = None) -> str | None:
  """The FedJAX runner script (:data:`FEDJAX_SCRIPT`), which only the
  repository has.

  Args:
    path: where it is (``--fedjax-script``); None: the repository's, under
      the working folder or beside the package's source (a checkout).

  Returns:
    Its absolute path, or None when there is no such file.

  >>> fedjax_script("no/such/fedjax_uniform.py") is None
  True
  """
  if path:
    return os.path.abspath(path) if os.path.isfile(path) else None
  root = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                      os.pardir, os.pardir)
  for where in (FEDJAX_SCRIPT, os.path.join(root, FEDJAX_SCRIPT)):
    if os.path.isfile(where):
      return os.path.abspath(where)
  return None


def run_fedjax(python: str | None, script: str | None, mix, reps: int,
               hidden: int, log=print) -> dict | None:
  """The uniform mix through FedJAX 0.0.17 in its own venv.

  Args:
    python: the venv's interpreter.
    script: the runner (:func:`fedjax_script`); None: not found.
    mix: the uniform mix.
    reps: timed rounds.
    hidden: the MLP's width.
    log: where the one-line messages go.

  Returns:
    The script's JSON (per-round ``times_s``, versions, peak RSS), an
    ``{"error": ...}`` dict when it failed, or None when the script or
    ``python`` is missing (install: :data:`FEDJAX_INSTALL`).
  """
  if script is None:
    log(f"  FedJAX: skipped, no {FEDJAX_SCRIPT} (the repository's, not "
        "installed with the package: run from the repository or pass "
        "--fedjax-script PATH): recording null")
    return None
  if not python or not os.path.exists(python):
    log(f"  FedJAX: no interpreter at {python!r}: recording null "
        f"(install: {FEDJAX_INSTALL})")
    return None
  x, y = _client_arrays(mix.data, mix.clients)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "uniform.npz")
    np.savez(path, x=x, y=y, num_classes=mix.num_classes)
    cmd = [python, script, path, "--reps", str(reps), "--warmup", "2",
           "--batch", str(int(mix.batch_size[0])),
           "--lr", str(float(mix.lr[0])), "--hidden", str(hidden),
           "--drop-remainder"]
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.setdefault("JAX_PLATFORMS", "cpu")
    try:
      p = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                         env=env, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
      log(f"  FedJAX failed: {e}")
      return {"error": str(e)}
  if p.returncode != 0:
    log(f"  FedJAX failed (exit {p.returncode}): {p.stderr[-2000:]}")
    return {"error": p.stderr[-2000:], "returncode": p.returncode}
  out = json.loads(p.stdout.strip().splitlines()[-1])
  out.update(python_path=python, script=script, install=FEDJAX_INSTALL)
  return out
