"""The round-kernel benchmark's headline figures and markdown table."""

from __future__ import annotations

from fedjax_bsa.bench.kernel import figures

__all__ = ["headline", "markdown"]

# (entry key, label, speedup field) in table order.
_ROWS = (("kernel", "kernel {headline}", None),
         ("kernel_default", "kernel at the default settings (noise "
          "estimates on)", None),
         ("ceiling", "ceiling: vmapped scan over pre-gathered batches",
          "fraction_of_ceiling"),
         ("kernel_noise_stats", "kernel + noise stats", None),
         ("kernel_mesh", "kernel, lanes over the mesh", None),
         ("kernel_unquantized", "kernel, b unquantized", None),
         ("padded", "padded", "speedup_vs_padded"),
         ("naive_loop", "naive loop", "speedup_vs_naive_loop"),
         ("reference_round", "reference_round (with stats)",
          "speedup_vs_reference_round_noise_stats"),
         ("fedjax", "FedJAX 0.0.17", "speedup_vs_fedjax"))


def headline(report: dict) -> dict:
  """The figures the issue asks for, flat (None where not measured)."""
  h = {}
  for name, r in report["mixes"].items():
    h[f"{name}: padding efficiency"] = r["padding_efficiency"]
    h[f"{name}: useful examples/s (median)"] = r["useful_examples_per_s"][
        "median"]
    h[f"{name}: fraction of matmul peak"] = r["fraction_of_matmul_peak"]
    h[f"{name}: speedup vs padded"] = r["speedup_vs_padded"]
    h[f"{name}: speedup vs naive loop"] = r["speedup_vs_naive_loop"]
    if "noise_stats_overhead" in r:
      h[f"{name}: noise stats time ratio (on/off)"] = r[
          "noise_stats_overhead"]
    if "kernel_unquantized" in r:
      h[f"{name}: padding efficiency, b unquantized"] = r[
          "kernel_unquantized"]["padding_efficiency"]
  if "uniform" in report["mixes"]:
    u = report["mixes"]["uniform"]
    h["uniform: speedup vs FedJAX 0.0.17"] = u["speedup_vs_fedjax"]
    if "kernel_default" in u:
      h["uniform: speedup vs FedJAX 0.0.17 (default settings, noise "
        "estimates on)"] = u["speedup_vs_fedjax_default"]
      h["uniform: fraction of the ceiling (default settings)"] = u[
          "fraction_of_ceiling_default"]
      h["uniform: fraction of the ceiling (best layout)"] = u[
          "fraction_of_ceiling"]
      h["uniform: default layout"] = u["default_layout"]
    fj = u.get("fedjax")
    if isinstance(fj, dict) and "jax_version" in fj:
      h["uniform: FedJAX versions"] = (f"fedjax {fj.get('fedjax_version')}, "
                                       f"jax {fj['jax_version']}")
  c = report.get("compile_test")
  if c:
    h[f"compiles over {c['rounds']} random plans"] = c["compiles"]
  lvs = report.get("large_vs_standard")
  if lvs:
    h["large/standard time per example"] = lvs["time_per_example_ratio"]
  return h


def _pct(x):
  return "n/a" if x is None else f"{100 * x:.1f}%"


def _ms(st):
  return (f"{st['median'] * 1e3:.1f} ({st['min'] * 1e3:.1f}-"
          f"{st['max'] * 1e3:.1f})")


def _row(mix: str, label: str, e: dict, speed) -> str:
  mem = figures.total_bytes(e)
  mem_s = "n/a" if mem is None else f"{mem / 2 ** 20:.1f} MiB"
  note = " (extrapolated)" if e.get("extrapolated") else ""
  return (f"| {mix} | {label}{note} | {_pct(e.get('padding_efficiency'))} "
          f"| {_ms(e['time_per_round_s'])} | "
          f"{e['useful_examples_per_s']['median']:.3g} | "
          f"{100 * e['fraction_of_matmul_peak']:.2f}% | "
          f"{'' if speed is None else f'{speed:.2f}x'} | {mem_s} |")


def _mix_rows(name: str, r: dict) -> list:
  lines = []
  mix = f"{name} ({r['mix']['clients']})"
  for key, label, speed in _ROWS:
    e = r.get(key)
    if key == "fedjax" and name == "uniform" and not isinstance(e, dict):
      lines.append(f"| {mix} | FedJAX 0.0.17 | not run (no venv) | | | | | |")
    if isinstance(e, dict) and "time_per_round_s" in e:
      lines.append(_row(mix, label.format(headline=r["headline"]), e,
                        r.get(speed) if speed else None))
  return lines


def _sweep_rows(name: str, r: dict) -> list:
  lines = [f"Lane sweep, {name} mix (noise stats off; headline "
           f"{r['headline']}):", "",
           "| lanes | mu | padding eff. | ms / round | useful ex/s | "
           "compile s | memory |", "|---|---|---|---|---|---|---|"]
  for e in r["lane_sweep"].values():
    mem = figures.total_bytes(e)
    lines.append(f"| {e['lanes']} | {e['microbatch']} | "
                 f"{_pct(e['padding_efficiency'])} | "
                 f"{_ms(e['time_per_round_s'])} | "
                 f"{e['useful_examples_per_s']['median']:.3g} | "
                 f"{e['compile_s']:.1f} | "
                 f"{'n/a' if mem is None else f'{mem / 2 ** 20:.1f} MiB'} |")
  return lines + [""]


def markdown(report: dict) -> str:
  """The report as a markdown page (machine, table, lane sweeps,
  headline)."""
  m, st, peak = report["machine"], report["settings"], report["matmul_peak"]
  lines = [
      f"# Round-kernel benchmark: {m['name']}", "",
      f"{m.get('cpu_model', m['device_kind'])} ({m['device_kind']}), "
      f"{m['cpu_count']} CPU cores, jax {report['versions']['jax']}, "
      f"python {report['versions']['python']}, {report['timestamp']}. "
      f"Load average at start/end: {report['loadavg_start']} / "
      f"{report.get('loadavg_end')}.", "",
      f"Dense float32 matmul ({peak['n']}^2): "
      f"{peak['flops_per_s'] / 1e9:.1f} GFLOP/s ({peak.get('measured', '')}"
      f"). Times per round in ms: median (min-max) of {st['reps']} "
      "interleaved repetitions after warm-up (large, cnn mixes: "
      f"{st['large_reps']}). 'speedup' = the method's median time / the "
      "kernel's (noise stats off; reference_round vs the kernel with "
      "noise stats). Memory: XLA's argument + output + temp bytes of the "
      "compiled round (naive loop: one step at b_max).", "",
      "| mix | method | padding eff. | ms / round | useful ex/s | "
      "% matmul peak | speedup | memory (XLA) |",
      "|---|---|---|---|---|---|---|---|"]
  for name, r in report["mixes"].items():
    lines += _mix_rows(name, r)
  lines.append("")
  for name, r in report["mixes"].items():
    lines += _sweep_rows(name, r)
  c = report.get("compile_test")
  if c:
    lines += [f"Compiles over {c['rounds']} random plans: {c['compiles']} "
              f"(padded layout would compile {c['padded_kernel_compiles']}"
              f" times, the naive loop {c['naive_loop_compiles']}).", ""]
  lines += ["Headline:", ""]
  for k, v in report.get("headline", {}).items():
    lines.append(f"- {k}: {f'{v:.3g}' if isinstance(v, float) else v}")
  return "\n".join(lines) + "\n"
