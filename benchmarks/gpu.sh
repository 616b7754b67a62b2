#!/usr/bin/env bash
# The round-kernel benchmark on a lent GPU: one prepared script.
#
#   bash benchmarks/gpu.sh            # on the GPU machine (writes to $OUT)
#   bash benchmarks/gpu.sh --quick    # tiny sizes: exercises it on a CPU
#
# Installs nothing. Needs a python with jax (CUDA build on a GPU), flax,
# optax, numpy and scikit-learn (the lent GPU image has them); fedjax_bsa and
# benchmarks are imported from this checkout (PYTHONPATH=repo root), so it
# needs no pip install either. Set PYTHON to choose the interpreter.
#
# Steps:
#   1. prints the devices and versions;
#   2. checks the kernel against fedjax_bsa.reference.reference_round on the
#      accelerator (a small random plan, allclose; exits 1 if it differs);
#   3. times the standard (64 clients), large (1024) and uniform mixes and a
#      CNN variant (cnn1d on MNIST-1D(-like) [40] inputs, 1024 clients)
#      against the padded kernel and the naive loop (benchmarks/round_kernel.py
#      with --check), writing round_kernel_<machine>.json/.md to $OUT
#      (default benchmarks/results);
#   4. prints a short table last.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3 || command -v python)}"
DEST="${OUT:-benchmarks/results}"
mkdir -p "$DEST"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# Let XLA grow its GPU memory instead of grabbing 75% up front, so the
# memory figures are the program's own.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"

QUICK=0
if [[ "${1:-}" == "--quick" ]]; then QUICK=1; shift; fi

"$PY" - <<'PYEOF'
import jax, jaxlib, platform
print("python", platform.python_version(), "jax", jax.__version__,
      "jaxlib", jaxlib.__version__)
print("devices:", jax.devices())
PYEOF
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
fi

if [[ $QUICK == 1 ]]; then
  # CPU smoke run: tiny mixes, 2 repetitions, includes the CNN variant.
  "$PY" -m benchmarks.round_kernel --quick --check --no-fedjax \
      --mixes standard,uniform,cnn --lanes 2 --uniform-lanes 2 --rounds 3 \
      --out "$DEST" "$@"
else
  "$PY" -m benchmarks.round_kernel --check --no-fedjax \
      --mixes standard,large,uniform,cnn --out "$DEST" "$@"
fi

"$PY" - "$DEST" <<'PYEOF'
import glob, json, os, sys
files = sorted(glob.glob(os.path.join(sys.argv[1], "round_kernel_*.json")),
               key=os.path.getmtime)
rep = json.load(open(files[-1]))
print()
print(f"== {rep['machine']['name']} ({rep['machine']['device_kind']}), "
      f"matmul {rep['matmul_peak']['flops_per_s'] / 1e12:.2f} TFLOP/s")
chk = rep.get("check", {})
print(f"check vs reference: delta {chk.get('allclose_delta')}, "
      f"loss {chk.get('allclose_loss')}, max err {chk.get('max_abs_err')}")
print(f"{'mix':<10}{'eff':>7}{'ms/round':>11}{'useful ex/s':>13}"
      f"{'%peak':>7}{'x padded':>10}{'x naive':>9}")
for name, r in rep["mixes"].items():
  t = r["kernel"]["time_per_round_s"]["median"] * 1e3
  print(f"{name:<10}{r['padding_efficiency']:>7.3f}{t:>11.1f}"
        f"{r['useful_examples_per_s']['median']:>13.3g}"
        f"{100 * r['fraction_of_matmul_peak']:>7.1f}"
        f"{r['speedup_vs_padded']:>10.2f}{r['speedup_vs_naive_loop']:>9.2f}")
c = rep.get("compile_test")
if c:
  print(f"compiles over {c['rounds']} random plans: {c['compiles']}")
PYEOF
