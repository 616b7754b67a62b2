"""The uniform mix through FedJAX 0.0.17 (run in FedJAX's own virtualenv).

FedJAX 0.0.17 needs an older jax than fedjax_bsa, so this file imports
neither fedjax_bsa nor flax: only numpy, jax, haiku and fedjax. It lives in
the repository, not in the package (which imports neither FedJAX nor
Haiku). The round-kernel benchmark
(:func:`fedjax_bsa.bench.kernel.baselines.run_fedjax`) writes the uniform
mix's client data to an ``.npz`` file and runs this file as a script, by
path (:func:`fedjax_bsa.bench.kernel.baselines.fedjax_script` finds it when
run from the repository; ``--fedjax-script PATH`` otherwise)::

    FJ_PYTHON benchmarks/fedjax_uniform.py DATA.npz --reps 7 \
        --warmup 2 --drop-remainder

which prints one JSON line (the last line of stdout) with the per-round times.

The install line (checked on this project's CPU machine, Python 3.11,
2026-12-03; jax 0.4.30 is the newest jax FedJAX 0.0.17 runs on)::

    python3 -m venv /tmp/fjvenv && /tmp/fjvenv/bin/pip install \
        fedjax==0.0.17 "jax[cpu]==0.4.30" jaxlib==0.4.30 dm-haiku==0.0.12 \
        optax==0.2.2 chex==0.1.86 "numpy<2" "scipy<1.13"

The work equals the kernel's uniform mix: the same MLP (64-256-10, ReLU,
softmax cross-entropy; Haiku's initializer instead of Flax's, which changes
no cost), the same clients' examples (256 rows each), batch 10, one epoch
with the last partial batch dropped (25 steps) of client SGD with lr 0.05
per client, FedAvg's example-weighted mean of the deltas, server SGD with
lr 1. It uses FedJAX's own machinery:
``fedjax.algorithms.fed_avg.federated_averaging`` (whose client loop is
``fedjax.for_each_client`` with its default jit backend) fed with
``fedjax.InMemoryFederatedData`` client datasets, batched by FedJAX's
``ShuffleRepeatBatchHParams(batch_size=10, num_epochs=1,
drop_remainder=True)``. A round is
``algorithm.apply(state, clients)`` for all 64 clients, blocked on the new
server parameters; it includes FedJAX's host-side shuffling and batching,
which is part of what FedJAX costs per round.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time


def _peak_rss_bytes():
  """This process's peak RSS. (``getrusage``'s ``ru_maxrss`` would carry
  the parent's peak over ``fork`` + ``exec`` on Linux.)"""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv=None) -> int:
  p = argparse.ArgumentParser()
  p.add_argument("data", help=".npz with x [K, n, d] float32, y [K, n] int32")
  p.add_argument("--reps", type=int, default=7)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--batch", type=int, default=10)
  p.add_argument("--epochs", type=int, default=1)
  p.add_argument("--lr", type=float, default=0.05)
  p.add_argument("--hidden", type=int, default=256)
  p.add_argument("--drop-remainder", action="store_true",
                 help="drop each epoch's last, partial batch")
  args = p.parse_args(argv)

  import numpy as np
  import jax
  import haiku as hk
  import fedjax
  from fedjax.algorithms import fed_avg

  z = np.load(args.data)
  x, y = z["x"].astype(np.float32), z["y"].astype(np.int32)
  num_clients, n, dim = x.shape
  num_classes = int(z["num_classes"]) if "num_classes" in z else 10

  def forward(batch):
    net = hk.Sequential([hk.Linear(args.hidden), jax.nn.relu,
                         hk.Linear(num_classes)])
    return net(batch["x"])

  model = fedjax.create_model_from_haiku(
      transformed_forward_pass=hk.transform(forward),
      sample_batch={"x": np.zeros((1, dim), np.float32),
                    "y": np.zeros((1,), np.int32)},
      train_loss=lambda b, preds: fedjax.metrics.unreduced_cross_entropy_loss(
          b["y"], preds))
  grad_fn = fedjax.model_grad(model)
  algorithm = fed_avg.federated_averaging(
      grad_fn, fedjax.optimizers.sgd(args.lr), fedjax.optimizers.sgd(1.0),
      fedjax.ShuffleRepeatBatchHParams(batch_size=args.batch,
                                       num_epochs=args.epochs,
                                       drop_remainder=args.drop_remainder))
  fd = fedjax.InMemoryFederatedData(
      {f"{k}".encode(): {"x": x[k], "y": y[k]} for k in range(num_clients)})
  state = algorithm.init(model.init(jax.random.PRNGKey(0)))
  ids = list(fd.client_ids())
  datasets = dict(fd.get_clients(ids))

  def one_round(state, r):
    rngs = jax.random.split(jax.random.PRNGKey(r), len(ids))
    clients = [(cid, datasets[cid], rngs[i]) for i, cid in enumerate(ids)]
    state, _ = algorithm.apply(state, clients)
    jax.block_until_ready(state.params)
    return state

  t0 = time.perf_counter()
  state = one_round(state, 0)
  first = time.perf_counter() - t0
  for r in range(1, args.warmup):
    state = one_round(state, r)
  times = []
  for r in range(args.reps):
    t0 = time.perf_counter()
    state = one_round(state, 100 + r)
    times.append(time.perf_counter() - t0)
  steps = (n // args.batch if args.drop_remainder else -(-n // args.batch))
  examples = num_clients * min(n, steps * args.batch) * args.epochs
  print(json.dumps({
      "fedjax_version": "0.0.17", "jax_version": jax.__version__,
      "python": sys.version.split()[0], "clients": num_clients,
      "examples_per_round": int(examples),
      "steps_per_client": int(steps * args.epochs),
      "drop_remainder": bool(args.drop_remainder),
      "first_round_s": first, "times_s": times,
      "peak_rss_bytes": _peak_rss_bytes(),
      "peak_rss_source": "VmHWM of /proc/self/status (this process only)",
  }))
  return 0


if __name__ == "__main__":
  sys.exit(main())
