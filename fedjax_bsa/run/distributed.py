"""Several devices and several hosts: meshes, global arrays, process 0.

JAX's own engine does the work: :func:`initialize` calls
``jax.distributed.initialize`` (one process per host), :func:`make_mesh`
lays a one-axis ``jax.sharding.Mesh`` over every device of every process,
and the arrays the compiled program reads are *global* ``jax.Array``\\ s
built with ``jax.make_array_from_callback``: each process materializes only
the rows its own devices hold (:func:`stacked`,
:func:`ragged_client_data`), or the
whole value for replicated arrays (:func:`replicated`). Outputs are fetched
with :func:`to_host` (an all-gather when a value spans several processes);
only process 0 writes files (:func:`is_main`).

Settings come from arguments or the environment (arguments win):
``FEDJAX_BSA_COORDINATOR=HOST:PORT``, ``FEDJAX_BSA_NUM_PROCESSES=N``,
``FEDJAX_BSA_PROCESS_ID=I``.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedjax_bsa.core.config import ConfigError
from fedjax_bsa.data import federated
from fedjax_bsa.data import ragged

__all__ = ["initialize", "make_mesh", "padded", "replicated",
           "stacked", "to_host", "is_main", "main_printer",
           "check_same_everywhere", "sync",
           "client_ranges", "ragged_client_data", "shard_clients"]

ENV_COORDINATOR = "FEDJAX_BSA_COORDINATOR"
ENV_NUM_PROCESSES = "FEDJAX_BSA_NUM_PROCESSES"
ENV_PROCESS_ID = "FEDJAX_BSA_PROCESS_ID"


def _int_setting(name: str, value, env: str) -> int | None:
  if value is None:
    value = os.environ.get(env) or None
  if value is None:
    return None
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ConfigError(f"{name}={value!r} is not allowed: expected an integer "
                     f"(from --{name.replace('_', '-')} or ${env})") from None


def initialize(coordinator: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Joins a multi-process JAX job if one is configured.

  Args:
    coordinator: ``HOST:PORT`` of process 0's coordination service (default
      ``$FEDJAX_BSA_COORDINATOR``), or ``auto`` to let
      ``jax.distributed.initialize`` detect the cluster (SLURM, Open MPI,
      TPU pods).
    num_processes: processes in the job (default
      ``$FEDJAX_BSA_NUM_PROCESSES``).
    process_id: this process, in ``[0, num_processes)`` (default
      ``$FEDJAX_BSA_PROCESS_ID``).

  Returns:
    True if ``jax.distributed.initialize`` was called (or already had been),
    False for a single-process run (no coordinator given).

  Raises:
    ValueError: a setting is missing or out of range.
  """
  coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
  n = _int_setting("num_processes", num_processes, ENV_NUM_PROCESSES)
  i = _int_setting("process_id", process_id, ENV_PROCESS_ID)
  if coordinator == "auto":  # SLURM, Open MPI, TPU pods, ...: JAX finds out
    if not jax.distributed.is_initialized():
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
      jax.distributed.initialize(num_processes=n, process_id=i)
    return True
  if coordinator is None:
    if n not in (None, 1) or i not in (None, 0):
      raise ConfigError("coordinator is missing: --num-processes/--process-id "
                       "need --coordinator HOST:PORT (or "
                       f"${ENV_COORDINATOR})")
    return False
  host, sep, port = coordinator.rpartition(":")
  if not sep or not host or not port.isdigit():
    raise ConfigError(f"coordinator={coordinator!r} is not allowed: expected "
                     "HOST:PORT, e.g. 10.0.0.1:1234")
  if n is None or n < 1:
    raise ConfigError(f"num_processes={n!r} is not allowed: give an integer "
                     f">= 1 with --num-processes (or ${ENV_NUM_PROCESSES})")
  if i is None or not 0 <= i < n:
    raise ConfigError(f"process_id={i!r} is out of range: must be in "
                     f"[0, {n - 1}] (--process-id or ${ENV_PROCESS_ID})")
  if jax.distributed.is_initialized():
    return True
  # CPU collectives across processes (harmless on GPU/TPU hosts).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator,
                             num_processes=n, process_id=i)
  return True


def make_mesh(axis_name: str, devices: Sequence | None = None) -> Mesh:
  """A one-axis mesh over ``devices`` (default: every device of every
  process), with automatic (compiler-propagated) sharding."""
  devs = np.array(list(devices) if devices is not None else jax.devices())
  return Mesh(devs, (axis_name,))


def padded(count: int, mesh: Mesh | None, multiple: int = 1) -> int:
  """``count`` rounded up to a multiple of ``multiple`` times the mesh's
  device count."""
  d = (1 if mesh is None else mesh.devices.size) * multiple
  return -(-count // d) * d


def _slice_of(index, size: int) -> range:
  sl = index[0] if index else slice(None)
  return range(*sl.indices(size))


def client_ranges(num_examples, num_devices: int) -> np.ndarray:
  """Splits clients into contiguous ranges with the fewest rows on the
  fullest range.

  Range ``d`` is clients ``bounds[d] <= k < bounds[d + 1]``. The largest
  range's row count is the least possible for contiguous ranges (a binary
  search on the capacity, each probe a greedy fill by ``np.searchsorted``):
  at most ``ceil(R / D) + max(num_examples) - 1``.

  Args:
    num_examples: int ``[N]`` rows per client (host).
    num_devices: ranges ``D >= 1``; trailing ranges may be empty.

  Returns:
    int64 ``[D + 1]`` non-decreasing bounds, ``bounds[0] = 0``,
    ``bounds[D] = N``.

  >>> client_ranges([5, 1, 1, 1, 4, 4], 3).tolist()
  [0, 2, 5, 6]
  """
  sizes = np.asarray(num_examples, np.int64)
  d_count = int(num_devices)
  if d_count < 1:
    raise ValueError(f"num_devices={num_devices} is not allowed: >= 1")
  cum = np.concatenate([[0], np.cumsum(sizes)])
  n = len(sizes)

  def fill(cap):
    bounds, start = [0], 0
    for _ in range(d_count):
      start = int(np.searchsorted(cum, cum[start] + cap, side="right")) - 1
      bounds.append(start)
    return np.array(bounds, np.int64) if start == n else None

  lo = max(-(-int(cum[-1]) // d_count), int(sizes.max(initial=0)))
  hi = max(lo, int(cum[-1]))
  while lo < hi:
    mid = (lo + hi) // 2
    if fill(mid) is None:
      lo = mid + 1
    else:
      hi = mid
  return fill(lo)


def ragged_client_data(x: np.ndarray, y: np.ndarray,
                       parts: Sequence[np.ndarray], mesh: Mesh | None,
                       axis_name: str) -> federated.FederatedData:
  """Clients' rows, stored once, sharded over ``axis_name`` by client ranges.

  :func:`shard_clients` of ``federated.from_partition(x, y, parts)``.

  Args:
    x: ``[T, *feature_shape]`` inputs (host, on every process).
    y: ``[T]`` labels.
    parts: one non-empty index array per client.
    mesh: the mesh (None: one device, plain ``device_put``).
    axis_name: the mesh axis the rows are split over.

  Returns:
    A :class:`~fedjax_bsa.data.federated.FederatedData` (see
    :func:`shard_clients`).
  """
  return shard_clients(federated.from_partition(x, y, parts), mesh, axis_name)


def shard_clients(data: federated.FederatedData, mesh: Mesh | None,
                  axis_name: str) -> federated.FederatedData:
  """Host ragged data laid out client-major over the devices of a mesh axis.

  Clients are split into ``D`` contiguous ranges of about equal row counts
  (:func:`client_ranges`); device ``d`` holds range ``d``'s rows, in client
  order, padded with zero rows to the fullest range's count ``S``, so the
  padding ``D * S - R`` is the only overhead and no device holds every
  client. ``x [D * S, ...]`` and ``y [D * S]`` are sharded over
  ``axis_name`` (replicated over other mesh axes; each process builds only
  the shards its devices hold); ``rows`` (now indices into the sharded
  ``x``), ``offset`` and ``num_examples`` are replicated. Client ``k``'s
  rows lie on device ``rows[offset[k]] // S``. Examples shared by several
  clients (e.g. after :func:`~fedjax_bsa.data.federated.merge`) are copied
  once per client.

  Args:
    data: a host :class:`~fedjax_bsa.data.federated.FederatedData`.
    mesh: the mesh (None: ``data`` moved to the default device as is).
    axis_name: the mesh axis the rows are split over.

  Returns:
    The same clients with the same examples, laid out as above.
  """
  if mesh is None:
    return jax.device_put(data)
  d_count = int(mesh.shape[axis_name])
  sizes = np.asarray(data.num_examples, np.int64)
  bounds = client_ranges(sizes, d_count)
  cum = np.concatenate([[0], np.cumsum(sizes)])
  first_row = cum[bounds]                      # [D + 1]
  counts = np.diff(first_row)                  # rows per device
  per = max(1, int(counts.max()))
  total = d_count * per
  if total > 2**31 - 1:
    raise ValueError(f"{total} padded rows: at most {2**31 - 1}")
  dev = np.repeat(np.arange(d_count), counts)
  new_rows = np.arange(cum[-1]) - first_row[dev] + dev * per
  src = ragged.client_major(
      federated.FederatedData(*(np.asarray(a) for a in data)))
  x, y = np.asarray(data.x), np.asarray(data.y)
  sharding = NamedSharding(mesh, P(axis_name))
  cache = {}

  def shard(index):
    rng = _slice_of(index, total)
    d = rng.start // per
    if d not in cache:
      r = src[first_row[d]:first_row[d + 1]]
      xs = np.zeros((per,) + x.shape[1:], np.float32)
      ys = np.zeros((per,), np.int32)
      xs[:len(r)] = x[r]
      ys[:len(r)] = y[r]
      cache[d] = (xs, ys)
    return cache[d]

  xg = jax.make_array_from_callback((total,) + x.shape[1:], sharding,
                                    lambda i: shard(i)[0], dtype=np.float32)
  yg = jax.make_array_from_callback((total,), sharding,
                                    lambda i: shard(i)[1], dtype=np.int32)
  rest = replicated((new_rows.astype(np.int32),
                     cum[:-1].astype(np.int32),
                     np.asarray(data.num_examples, np.int32)), mesh)
  return federated.FederatedData(xg, yg, *rest)

def replicated(tree, mesh: Mesh | None):
  """Host values as arrays replicated on every device of ``mesh``."""
  if mesh is None:
    return jax.device_put(tree)
  sharding = NamedSharding(mesh, P())

  def one(a):
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, sharding, lambda _: a,
                                        dtype=a.dtype)
  return jax.tree.map(one, tree)


def stacked(count: int, build: Callable[[int], object], mesh: Mesh | None,
            axis_name: str, total: int | None = None):
  """Per-experiment host pytrees stacked on a leading ``[count']`` axis.

  Args:
    count: experiments ``E``.
    build: ``build(e) -> pytree`` of numpy arrays, the same shapes for every
      ``e``; called only for the experiments this process's devices hold
      (and for experiment 0, to learn the shapes). Padding entries (``e >=
      E``) repeat experiment ``E - 1``.
    mesh: the mesh (None: one device).
    axis_name: the mesh axis of the experiment axis.
    total: the padded length ``E'`` (default ``padded(E, mesh)``; a multiple
      of the device count).

  Returns:
    The stacked pytree, ``[E', ...]`` per leaf, sharded over ``axis_name``.
  """
  total = padded(count, mesh) if total is None else total
  if total % (1 if mesh is None else mesh.devices.size) or total < count:
    raise ValueError(f"total={total} is not allowed: a multiple of the "
                     f"device count, >= {count}")
  cache = {}

  def get(e):
    e = min(e, count - 1)
    if e not in cache:
      cache[e] = jax.tree.map(np.asarray, build(e))
    return cache[e]

  if mesh is None:
    trees = [get(e) for e in range(total)]
    return jax.device_put(jax.tree.map(lambda *a: np.stack(a), *trees))
  first = get(0)
  sharding = NamedSharding(mesh, P(axis_name))
  leaves, treedef = jax.tree.flatten(first)

  def leaf(i):
    def cb(index):
      ids = _slice_of(index, total)
      return np.stack([jax.tree.leaves(get(e))[i] for e in ids])
    a = leaves[i]
    return jax.make_array_from_callback((total,) + a.shape, sharding, cb,
                                        dtype=a.dtype)
  return treedef.unflatten([leaf(i) for i in range(len(leaves))])


def to_host(tree):
  """Numpy copies of (possibly multi-process) arrays, on every process."""
  def one(a):
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
      if a.sharding.is_fully_replicated:
        return np.asarray(a.addressable_data(0))
      return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return np.asarray(a)
  return jax.tree.map(one, tree)


def is_main() -> bool:
  """True on the process that writes outputs (process 0)."""
  return jax.process_index() == 0


def main_printer(stream):
  """``log(msg)``: prints a line to ``stream`` on the main process only."""
  def log(msg):
    if is_main():
      print(msg, file=stream, flush=True)
  return log


def check_same_everywhere(text: str, what: str) -> None:
  """Raises ``ValueError`` unless every process passes the same ``text``
  (e.g. the output folder, which must be one shared path)."""
  if jax.process_count() == 1:
    return
  import hashlib  # pylint: disable=g-import-not-at-top
  digest = np.frombuffer(hashlib.sha256(text.encode()).digest()[:8],
                         np.int32)
  every = np.asarray(multihost_utils.process_allgather(digest))
  if not (every == every[:1]).all():  # every process raises alike
    raise ConfigError(f"{what} differs between processes (this one: {text}):"
                     " every process must name the same folder, on a shared "
                     "filesystem")


def sync(name: str) -> None:
  """A barrier across processes (a no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
