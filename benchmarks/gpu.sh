#!/usr/bin/env bash
# The benchmarks on a lent accelerator: one prepared script.
#
#   OUT=/some/dir bash benchmarks/gpu.sh          # on the GPU machine
#   OUT=/tmp/gpuquick bash benchmarks/gpu.sh --quick   # tiny sizes, on a CPU
#
# Installs nothing. Needs a python with jax (a CUDA build on a GPU), flax,
# optax, numpy and scikit-learn; fedjax_bsa is imported from this checkout
# (PYTHONPATH = the repository root). PYTHON chooses the interpreter.
#
# Steps (each under its own time limit, so that the whole script fits in
# about 8 minutes on a GPU; every benchmark writes its JSON after each part,
# so a step cut by its limit keeps what it measured):
#   1. the devices and versions;
#   2. the kernel against fedjax_bsa.kernel.reference.reference_round on the
#      device (python -m fedjax_bsa.bench.kernel.checks): exit 1 if they
#      differ;
#   3. the round kernel on the standard (64 clients), uniform (FedJAX's
#      setting), large (1024), cnn1d (1-D CNN, 1024) and cnn2d (CIFAR-size
#      2-D CNN, 64) mixes against the padded layout and the naive loop,
#      with a lane sweep (GPU: 16, 64, 256 lanes x microbatch 4, 16), the
#      compile test and the matmul peak -> round_kernel_<machine>.json/.md;
#   4. the sweep: 8 experiments packed vs run one after another, compiled
#      loop and end to end, noise_scale then constant -> sweep_<machine>.json;
#   5. the scale run, if benchmarks/scale.py exists;
#   6. only when STUDY names datasets (e.g. STUDY=digits,synthetic): the
#      regime study on them (fedjax-bsa study --datasets $STUDY, plus any
#      STUDY_ARGS) -> regimes.json/.md/_heatmap.png and its cache under
#      $DEST; it resumes from that cache, so a study cut by STUDY_S continues
#      when the script runs again with the same DEST. The full study needs
#      hours of CPU time; a 15-minute GPU lease fits one dataset at most;
#   7. a short table.
# Limits in seconds (environment): CHECK_S, KERNEL_S, SWEEP_S, SCALE_S,
# STUDY_S.
# Exit: 0 all steps passed; 1 the kernel differs from the reference; 2 a
# later step failed or hit its limit (its partial JSON is kept).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3 || command -v python)}"
QUICK=0
if [[ "${1:-}" == "--quick" ]]; then QUICK=1; shift; fi
# a quick run never writes into the committed results unless OUT says so
if [[ $QUICK == 1 ]]; then DEST="${OUT:-runs/benchmarks}"
else DEST="${OUT:-benchmarks/results}"; fi
mkdir -p "$DEST"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# Let XLA grow its GPU memory instead of grabbing 75% up front, so that the
# memory figures are the program's own.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"

if [[ $QUICK == 1 ]]; then
  # a smoke test of every step within about 90 s on a 2-core CPU
  CHECK_S=${CHECK_S:-120}; KERNEL_S=${KERNEL_S:-400}
  SWEEP_S=${SWEEP_S:-300}; SCALE_S=${SCALE_S:-120}
  KERNEL_ARGS=(--quick --mixes standard,uniform)
  # the compiled loop is covered by tests/test_bench_smoke.py
  SWEEP_ARGS=(--quick --experiments 2 --controllers noise_scale
              --measures end_to_end --e2e-rounds 2)
  SCALE_ARGS=(--quick)
else
  CHECK_S=${CHECK_S:-75}; KERNEL_S=${KERNEL_S:-220}
  SWEEP_S=${SWEEP_S:-120}; SCALE_S=${SCALE_S:-110}
  KERNEL_ARGS=(--mixes standard,uniform,large,cnn1d,cnn2d)
  SWEEP_ARGS=(--experiments 8 --rounds 10 --reps 3 --e2e-rounds 20
              --e2e-reps 1)
  SCALE_ARGS=(--clients 1000000)
fi

FAILED=()
step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=15 "$limit" "$@"
  rc=$?
  echo "== $name: exit $rc after $(( $(date +%s) - start ))s"
  if [[ $rc != 0 ]]; then FAILED+=("$name (exit $rc$([[ $rc == 124 ]] && echo ', time limit'))"); fi
  return $rc
}

"$PY" - <<'PYEOF'
import jax, jaxlib, platform
print("python", platform.python_version(), "jax", jax.__version__,
      "jaxlib", jaxlib.__version__)
print("devices:", jax.devices())
PYEOF
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
fi

step check "$CHECK_S" "$PY" -m fedjax_bsa.bench.kernel.checks --out "$DEST"
rc=$?
if [[ $rc == 1 ]]; then
  echo "the kernel differs from reference_round on this device: stopping" >&2
  exit 1
elif [[ $rc != 0 ]]; then
  echo "the check did not finish (exit $rc): timings follow, unchecked" >&2
fi
step kernel "$KERNEL_S" "$PY" -m fedjax_bsa.bench.kernel \
    "${KERNEL_ARGS[@]}" --no-fedjax --out "$DEST" "$@"
step sweep "$SWEEP_S" "$PY" -m fedjax_bsa.bench.sweep \
    "${SWEEP_ARGS[@]}" --out "$DEST"
if [ -f benchmarks/scale.py ]; then
  step scale "$SCALE_S" "$PY" -m benchmarks.scale "${SCALE_ARGS[@]}" \
      --out "$DEST"
fi

if [[ -n "${STUDY:-}" ]]; then
  # shellcheck disable=SC2086
  step study "${STUDY_S:-600}" "$PY" -m fedjax_bsa.bench.study \
      --datasets "$STUDY" --out "$DEST" ${STUDY_ARGS:-}
fi

"$PY" - "$DEST" <<'PYEOF'
import glob, json, os, sys

def newest(pattern):
  files = sorted(glob.glob(os.path.join(sys.argv[1], pattern)),
                 key=os.path.getmtime)
  return json.load(open(files[-1])) if files else None

chk = newest("check_*.json")
if chk:
  print(f"\ncheck vs reference_round on {chk['device']}: ok={chk['ok']}")
rep = newest("round_kernel_*.json")
if rep:
  m = rep["machine"]
  print(f"== {m['name']} ({m['device_kind']}), matmul "
        f"{rep['matmul_peak']['flops_per_s'] / 1e12:.2f} TFLOP/s")
  print(f"{'mix':<10}{'layout':>12}{'eff':>7}{'ms/round':>11}"
        f"{'useful ex/s':>13}{'%peak':>7}{'x padded':>10}{'x naive':>9}")
  for name, r in rep.get("mixes", {}).items():
    t = r["kernel"]["time_per_round_s"]["median"] * 1e3
    print(f"{name:<10}{r['headline']:>12}{r['padding_efficiency']:>7.3f}"
          f"{t:>11.1f}{r['useful_examples_per_s']['median']:>13.3g}"
          f"{100 * r['fraction_of_matmul_peak']:>7.2f}"
          f"{r['speedup_vs_padded']:>10.2f}{r['speedup_vs_naive_loop']:>9.2f}")
  c = rep.get("compile_test")
  if c:
    print(f"compiles over {c['rounds']} random plans: {c['compiles']}")
sw = newest("sweep_*.json")
if sw:
  for ctrl, r in sw.get("results", {}).items():
    for measure in ("compiled_loop", "end_to_end"):
      if measure in r:
        x = r[measure]
        print(f"sweep {ctrl:<12} {measure:<14} E={x['experiments']}: "
              f"packed {x['packed']['median']:.3f}s, sequential "
              f"{x['sequential']['median']:.3f}s, {x['speedup']:.2f}x")
PYEOF

if (( ${#FAILED[@]} )); then
  echo "steps that failed or hit their limit: ${FAILED[*]}" >&2
  exit 2
fi
echo "all steps passed; JSON in $DEST"
