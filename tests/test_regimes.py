"""The regime study: quick mode end to end, and its definitions on
hand-made runs (targets, tuning, speedups, retiming)."""

import json
import math

import numpy as np
import pytest

from fedjax_bsa import Config
from fedjax_bsa.bench.study import cells
from fedjax_bsa.bench.study import main as study_main
from fedjax_bsa.bench.study import report
from fedjax_bsa.run import driver
from fedjax_bsa.run import loop
from fedjax_bsa.run.outputs import Outputs
from fedjax_bsa.setup import experiment


def test_quick_mode_writes_the_report(tmp_path):
  assert study_main.main(["--quick", "--out", str(tmp_path)]) == 0
  rep = json.loads((tmp_path / "regimes_quick.json").read_text())
  (cell,) = rep["cells"]
  for key in ("dataset", "alpha", "devices", "local_work", "comm_ratio",
              "headroom", "target", "tuned", "reference", "methods"):
    assert key in cell
  assert cell["dataset"] == "digits" and cell["local_work"] == "deadline"
  assert "goodput+fednova" in cell["methods"]
  sp = cell["methods"]["goodput+fednova"]["speedup"]
  assert set(sp) >= {"median", "lo", "hi"}
  # the tuned fixed batch against itself, on the same seeds: exactly 1
  assert cell["methods"]["fixed+fednova"]["speedup"]["median"] == 1.0
  assert cell["headroom"] >= 1.0
  assert (tmp_path / "regimes_quick.md").read_text().count("| 0.1 |") == 1
  assert (tmp_path / "regimes_quick_heatmap.png").stat().st_size > 1000
  # every run records the spread of its plans
  doc = json.loads(next((tmp_path / "regimes_cache").rglob(
      "report-*goodput*.json")).read_text())
  run = doc["runs"][0]
  for k in ("batch", "lr", "steps", "eta_s"):
    sp = run["plan"][k]
    assert sp["p10"] <= sp["mean"] <= sp["p90"]
  assert run["examples"] > 0 and run["bytes"] > 0 and "diverged" in run
  assert run["heterogeneity"] and min(run["heterogeneity"]) >= 0.0
  assert cell["cohort_spread"] is not None and cell["cohort_spread"] >= 0
  # a second run reuses every cached sweep (no new cache files)
  cache = sorted(p.name for p in (tmp_path / "regimes_cache").rglob("*"))
  assert study_main.main(["--quick", "--out", str(tmp_path)]) == 0
  assert sorted(p.name for p in
                (tmp_path / "regimes_cache").rglob("*")) == cache
  # and still reports what its sweeps took when they ran
  again = json.loads((tmp_path / "regimes_quick.json").read_text())
  took = rep["datasets"]["digits"]["wall_s"]
  assert took > 0 and again["datasets"]["digits"]["wall_s"] == took


def _run(seed, times, accs, batch=8):
  cell = dict(alpha=0.1, devices="heterogeneous", local_work="deadline",
              comm_ratio=1.0)
  return dict(id=json.dumps([cell, batch, seed], sort_keys=True),
              rounds=[0, 5, 10], accuracy=accs, final_accuracy=accs[-1],
              sim_time={"run": times}, examples=1, bytes=1,
              noise_scale=[])


def test_tuning_and_speedups_by_hand():
  # batch 8 reaches 0.95 * 0.8 = 0.76 at t=10 on both tuning seeds,
  # batch 32 at t=20: 8 is the tuned batch
  tune_runs = {("deadline", "fednova"): [
      dict(_run(100, [0, 10, 20], [0.1, 0.77, 0.8], 8),
           heterogeneity=[1.0, 3.0]),
      dict(_run(101, [0, 10, 20], [0.1, 0.78, 0.8], 8),
           heterogeneity=[2.0]),
      _run(100, [0, 5, 20], [0.1, 0.5, 0.8], 32),
      _run(101, [0, 5, 20], [0.1, 0.5, 0.79], 32)]}
  tuning = report.tune(tune_runs, [8, 32])
  (t,) = tuning.values()
  assert t["target"] == pytest.approx(0.95 * 0.8)
  assert t["tuned"]["fednova"]["batch"] == 8
  assert t["reference"] == dict(aggregation="fednova", batch=8)
  runs = {("deadline", "fednova", "fixed"): [
              _run(0, [0, 10, 20], [0.1, 0.8, 0.8]),
              _run(1, [0, 12, 24], [0.1, 0.8, 0.8])],
          ("deadline", "fednova", "goodput"): [
              _run(0, [0, 5, 10], [0.1, 0.8, 0.8], None),
              dict(_run(1, [0, 6, 12], [0.1, 0.5, 0.8], None),
                   diverged=True)]}
  (c,) = report.cell_results(tuning, runs, ["goodput"], ["fednova"])
  assert c["methods"]["goodput+fednova"]["diverged"] == 1
  assert c["methods"]["fixed+fednova"]["diverged"] == 0
  sp = c["methods"]["goodput+fednova"]["speedup"]
  # seed 0: 10 / 5 = 2; seed 1: 12 / 12 = 1
  assert sorted(sp["per_seed"]) == [1.0, 2.0] and sp["median"] == 1.5
  assert sp["lo"] >= 1.0 and sp["hi"] <= 2.0
  # the tuning curve: median time to 0.76 per grid point; batch 32
  # reaches it only at t=20 on both seeds
  assert t["tuning_curve"] == {"fednova_b8": 10.0, "fednova_b32": 20.0}
  # its cost: 4 runs of 20 simulated seconds each
  assert t["tuning_cost"] == dict(runs=4, sim_time_s=80.0)
  assert c["tuning_cost"] == t["tuning_cost"]
  # the cohort's spread: median over the tuning runs' evaluations
  assert t["cohort_spread"] == 2.0 and c["cohort_spread"] == 2.0
  inc = c["methods"]["goodput+fednova"]["speedup_incl_tuning"]
  # seed 0: (10 + 80) / 5 = 18; seed 1: (12 + 80) / 12
  assert sorted(inc["per_seed"]) == pytest.approx([92 / 12, 18.0])
  assert "speedup_incl_tuning" not in c["methods"]["fixed+fednova"]


def test_a_method_that_never_reaches_the_target_scores_zero():
  rng = np.random.default_rng(0)
  s = report.speedup_stats({0: 10.0, 1: 10.0}, {0: math.inf, 1: 5.0}, rng)
  assert sorted(s["per_seed"]) == [0.0, 2.0]
  assert report.speedup_stats({0: math.inf}, {0: math.inf},
                              rng)["median"] is None


def test_retiming_reproduces_the_clock_and_scales_communication():
  """Under wait_all rounds, recomputing the clock from the per-round plans
  gives the recorded times; a faster link shortens every round by the
  slowest participant's saved communication."""
  cfg = Config(num_clients=20, clients_per_round=5, hidden=8, rounds=6,
               eval_every=3, progress=False, local_work="steps",
               local_steps=3, speed_sigma=1.0, controller="goodput")
  pre = driver.prepare(cfg, [{}], mesh=None)
  out = Outputs(cfg, None)
  loop.execute(pre, [out])
  exp = pre.experiments[0]
  parts = cells.round_parts(exp, out.clients())
  rounds = [r["round"] for r in out.records]
  again = cells.retime_parts(parts, rounds, cfg.bandwidth)
  np.testing.assert_allclose(again, [r["sim_time_s"] for r in out.records],
                             rtol=1e-5)
  faster = cells.retime_parts(parts, rounds, 10 * cfg.bandwidth)
  assert all(f < a for f, a in zip(faster[1:], again[1:]))


def test_bandwidth_for_a_ratio():
  cfg = Config(num_clients=20, local_work="steps", local_steps=20,
               batch_size=8, base_speed=1000.0, step_overhead=0.01)
  exp = experiment.build(cfg)
  bw = cells.bandwidth_for(cfg, exp, 2.0)
  compute = 20 * (0.01 + 8 / 1000.0)
  assert 2 * exp.model_bytes / bw == pytest.approx(compute / 2.0)


def test_parts_of_a_dataset_merge_cell_by_cell():
  """A run over some axes replaces the cells it ran and keeps the others;
  a part whose cells are all replaced is dropped, and the time adds up."""
  def cell(alpha, lw, tag):
    return dict(alpha=alpha, devices="homogeneous", local_work=lw,
                comm_ratio=1.0, tag=tag)

  def part(cells, wall):
    return dict(cells=cells, wall_s=wall, trends={"t": {}},
                settings=dict(alphas=sorted({c["alpha"] for c in cells})))

  a = study_main._merge_dataset(None, part(
      [cell(0.1, "epochs", "a"), cell(0.1, "deadline", "a")], 60.0))
  b = study_main._merge_dataset(a, part([cell(1.0, "epochs", "b")], 30.0))
  assert sorted((c["alpha"], c["tag"]) for c in b["cells"]) == [
      (0.1, "a"), (0.1, "a"), (1.0, "b")]
  assert len(b["parts"]) == 2 and b["wall_s"] == 90.0
  c = study_main._merge_dataset(b, part([cell(0.1, "epochs", "c"),
                                         cell(0.1, "deadline", "c")], 10))
  assert sorted((c_["alpha"], c_["tag"]) for c_ in c["cells"]) == [
      (0.1, "c"), (0.1, "c"), (1.0, "b")]
  assert len(c["parts"]) == 2 and c["wall_s"] == 40.0
  # c's cells replaced by two later parts, one cell each: c is dropped
  d = study_main._merge_dataset(c, part([cell(0.1, "epochs", "d")], 5))
  assert len(d["parts"]) == 3 and d["wall_s"] == 45.0
  e = study_main._merge_dataset(d, part([cell(0.1, "deadline", "e")], 7))
  assert [p["wall_s"] for p in e["parts"]] == [30.0, 5, 7]
  assert sorted((c_["alpha"], c_["tag"]) for c_ in e["cells"]) == [
      (0.1, "d"), (0.1, "e"), (1.0, "b")]


def test_mcmahan_trend_by_hand_and_not_measurable_when_no_batch_reaches():
  """Rounds to the target by batch (one epoch, FedAvg): batch 4 at round
  5, batch 8 at 10, batch 32 never: reproduced. No batch reaching the
  target is not measurable (None), not 'reproduced' (inf <= inf)."""
  cell = dict(alpha=0.1, devices="heterogeneous", local_work="epochs",
              comm_ratio=None)

  def run(b, accs):
    return dict(id=json.dumps([cell, b, 100], sort_keys=True),
                rounds=[0, 5, 10], accuracy=accs, final_accuracy=accs[-1],
                sim_time={"1.0": [0.0, 1.0, 2.0]})

  tuning = {report._key(dict(cell, comm_ratio=1.0)): dict(target=0.5)}
  runs = [run(4, [0.1, 0.6, 0.7]), run(8, [0.1, 0.3, 0.55]),
          run(32, [0.1, 0.2, 0.3])]
  t = report.trends({("epochs", "fedavg"): runs}, {}, tuning, [])
  m = t["mcmahan_2017"]
  assert m["median_rounds_by_batch"] == {"4": 5.0, "8": 10.0, "32": None}
  assert m["reproduced"] is True
  runs = [run(4, [0.1, 0.3, 0.6]), run(8, [0.1, 0.6, 0.7])]
  assert report.trends({("epochs", "fedavg"): runs}, {}, tuning, [])[
      "mcmahan_2017"]["reproduced"] is False
  runs = [run(4, [0.1, 0.2, 0.3]), run(8, [0.1, 0.2, 0.3])]
  assert report.trends({("epochs", "fedavg"): runs}, {}, tuning, [])[
      "mcmahan_2017"]["reproduced"] is None


def test_cached_sweep_is_retimed_for_ratios_asked_later(tmp_path,
                                                         monkeypatch):
  """A cached wait_all sweep asked for a ratio it was not timed at gives
  the clock a fresh run at both ratios gives, without running again; an
  older cache without round parts runs again."""
  cfg = Config(num_clients=20, clients_per_round=5, hidden=8, rounds=4,
               eval_every=2, progress=False, local_work="steps",
               local_steps=2, speed_sigma=1.0)
  exps = [dict(id="a", seed=0), dict(id="b", seed=1, batch_size=16)]
  one, both = {1.0: 1e5}, {1.0: 1e5, 10.0: 1e4}
  first = cells.run_sweep_cached(cfg, exps, str(tmp_path / "c"), "k",
                                   one, log=lambda m: None)
  assert all(set(r["sim_time"]) == {"1.0"} for r in first)
  fresh = cells.run_sweep_cached(cfg, exps, str(tmp_path / "d"), "k",
                                   both, log=lambda m: None)
  assert fresh[0]["sim_time"]["10.0"] != fresh[0]["sim_time"]["1.0"]

  def no_run(*a, **k):
    raise AssertionError("ran again")
  monkeypatch.setattr(driver, "prepare", no_run)
  again = cells.run_sweep_cached(cfg, exps, str(tmp_path / "c"), "k",
                                   both, log=lambda m: None)
  for a, f in zip(again, fresh):
    for k in ("1.0", "10.0"):
      np.testing.assert_allclose(a["sim_time"][k], f["sim_time"][k],
                                 rtol=1e-6)
  monkeypatch.undo()
  (path,) = (tmp_path / "c").glob("*.json")
  doc = json.loads(path.read_text())
  for r in doc["runs"]:
    del r["round_parts"]
  path.write_text(json.dumps(doc))
  rerun = cells.run_sweep_cached(cfg, exps, str(tmp_path / "c"), "k",
                                   both, log=lambda m: None)
  assert all(set(r["sim_time"]) == {"1.0", "10.0"} for r in rerun)
  assert "round_parts" in json.loads(path.read_text())["runs"][0]


def test_seed_lists_counts_ranges_and_errors():
  from fedjax_bsa.bench.study import main as rm
  assert rm.parse_seeds("2", 0) == [0, 1]
  assert rm.parse_seeds("20-24", 0) == [20, 21, 22, 23, 24]
  assert rm.parse_seeds("30,31", 100) == [30, 31]
  for bad in ("0", "5-3", "a", "1,1", "2-"):
    with pytest.raises(ValueError):
      rm.parse_seeds(bad, 0)
  args = rm._parser().parse_args(["--seeds", "20-22", "--tuning-seeds", "2"])
  assert args.seeds == [20, 21, 22] and args.tuning_seeds == [100, 101]
  with pytest.raises(SystemExit):
    rm._parser().parse_args(["--seeds", "3-1"])


def test_a_seed_that_cannot_draw_its_partition_is_replaced_and_named(
    monkeypatch):
  """digits at alpha 0.1: seed 21 cannot give all 50 clients 5 rows (the
  seed the first study dropped silently). It is replaced by the next free
  seed that can (above every asked seed, never one already asked),
  recorded and named in the table; a hopeless alpha is one clear error."""
  study = cells.Study("digits", alphas=[0.1], seeds=[20, 21],
                        tuning=[30], log=lambda m: None)
  assert study._drawable(0.1, 20) and not study._drawable(0.1, 21)
  reported, tuning = study.seeds_for(0.1)
  assert reported == [20, 31] and tuning == [30]
  assert study.replaced == {"0.1": {"reported": {"21": 31}}}
  from fedjax_bsa.bench.study import figures
  (line, _) = figures._replacements(study.replaced)
  assert "alpha 0.1, reported seed 21 -> 31" in line
  monkeypatch.setattr(cells, "MAX_SEED_TRIES", 2)
  hopeless = cells.Study("digits", alphas=[0.03], seeds=[0], tuning=[1],
                           log=lambda m: None)
  with pytest.raises(cells.ConfigError, match="alpha=0.03: seed 0"):
    hopeless.seeds_for(0.03)


def test_study_progress_counts_runs_and_estimates_the_time_left(
    monkeypatch):
  lines = []
  study = cells.Study("digits", alphas=[1.0], devices=["homogeneous"],
                        local_work=["steps"], comm=[1.0], seeds=[0, 1],
                        tuning=[2], batches=[4, 8], methods=["goodput"],
                        aggregations=["fedavg"], log=lines.append)
  # tuning: 1 cell x 2 batches x 1 seed; report: 2 seeds x (fixed + 1)
  assert study.total_runs() == 6
  now = [0.0]
  study.clock = lambda: now[0]
  ran = []

  def fake(base, exps, cache_dir, key, retimes, log, seconds):
    ran.append(key)
    now[0] += 0.0 if key.startswith("report-steps-fedavg-fixed") else (
        10.0 * len(exps))   # 10 s a run; the fixed sweep comes from cache
    return []
  monkeypatch.setattr(cells, "run_sweep_cached", fake)
  study.sweep("tune", "steps", "fedavg", "fixed", {}, [{}, {}])
  assert lines == []        # a sweep on its own: no study progress
  now[0] = 0.0
  study._begin()  # pylint: disable=protected-access
  study.sweep("tune", "steps", "fedavg", "fixed", {}, [{}, {}])
  assert lines[-1] == "digits: 2/6 runs, 20 s spent, about 40 s left"
  study.sweep("report", "steps", "fedavg", "fixed", {}, [{}, {}])
  assert lines[-1] == "digits: 4/6 runs, 20 s spent, about 20 s left"
  study.sweep("report", "steps", "fedavg", "goodput", {}, [{}, {}])
  assert lines[-1] == "digits: 6/6 runs, 40 s spent"


def test_untuned_defaults_run_their_own_protocol_in_every_cell():
  study = cells.Study("digits", alphas=[1.0], log=lambda m: None)
  for lw in cells.LOCAL_WORK:
    mc = study.config(lw, "fedavg", cells.METHODS["mcmahan"]).validate()
    assert (mc.batch_size, mc.local_work, mc.local_epochs) == (10, "epochs",
                                                              1.0)
    assert mc.client_lr == study.base.client_lr and mc.lr_decay == 1.0
    fs = study.config(lw, "fednova", cells.METHODS["fedscale"]).validate()
    assert (fs.batch_size, fs.local_work, fs.local_steps, fs.client_lr,
            fs.lr_decay, fs.lr_decay_every, fs.lr_min) == (
                30, "steps", 20, 0.05, 0.98, 10, 5e-5)


def test_the_oracle_tunes_batch_and_rate_pairs(monkeypatch):
  """A (batch, rate) grid: the tuned point is a pair, the report runs it
  with its rate, and its runs are matched by the pair."""
  tune_runs = {("deadline", "fednova"): [
      _run(100, [0, 10, 20], [0.1, 0.77, 0.8], [8, 0.1]),
      _run(101, [0, 10, 20], [0.1, 0.78, 0.8], [8, 0.1]),
      _run(100, [0, 4, 20], [0.1, 0.77, 0.8], [8, 0.4]),
      _run(101, [0, 6, 20], [0.1, 0.78, 0.8], [8, 0.4]),
      _run(100, [0, 5, 20], [0.1, 0.5, 0.8], [32, 0.4]),
      _run(101, [0, 5, 20], [0.1, 0.5, 0.79], [32, 0.4])]}
  (t,) = report.tune(tune_runs, [8, 32]).values()
  assert t["tuned"]["fednova"] == dict(batch=8, lr=0.4, median_time_s=5.0)
  assert t["reference"] == dict(aggregation="fednova", batch=8, lr=0.4)
  assert t["tuning_curve"] == {"fednova_b8_lr0.1": 10.0,
                               "fednova_b8_lr0.4": 5.0,
                               "fednova_b32_lr0.4": 20.0}
  ((_, pairs),) = report.tuned_pairs({"c": t}).items()
  assert [p for _, p in pairs] == [(8, 0.4)]
  runs = {("deadline", "fednova", "fixed"): [
              _run(0, [0, 5, 20], [0.1, 0.8, 0.8], [8, 0.4])],
          ("deadline", "fednova", "goodput"): [
              _run(0, [0, 10, 20], [0.1, 0.8, 0.8], None)]}
  (c,) = report.cell_results({"c": t}, runs, ["goodput"], ["fednova"])
  assert c["methods"]["goodput+fednova"]["speedup"]["median"] == 0.5
  # the study runs the pair with its rate
  study = cells.Study("digits", alphas=[0.1], devices=["heterogeneous"],
                        local_work=["deadline"], comm=[1.0], seeds=[0],
                        tuning=[100], batches=[8, 32], lr_factors=[0.5, 2],
                        methods=[], aggregations=["fednova"],
                        log=lambda m: None)
  lr = study.base.client_lr
  assert study.grid() == [[8, 0.05], [8, 0.2], [32, 0.05], [32, 0.2]]
  assert lr == 0.1     # the dataset's rate: factors 0.5 and 2
  assert study.total_runs() == 4 + 1
  seen = {}

  def fake(base, exps, cache_dir, key, retimes, log, seconds):
    seen[key] = exps
    return []
  monkeypatch.setattr(cells, "run_sweep_cached", fake)
  study.tune()
  exps = seen["tune-deadline-fednova-fixed"]
  assert sorted((e["batch_size"], e["client_lr"]) for e in exps) == sorted(
      (b, r) for b, r in study.grid())
  cell = json.loads(exps[0]["id"])[0]
  study.report_runs({("deadline", "fednova"): [(cell, (8, 0.2))]})
  (e,) = seen["report-deadline-fednova-fixed"]
  assert (e["batch_size"], e["client_lr"]) == (8, 0.2)
  assert json.loads(e["id"])[1] == [8, 0.2]


def test_successive_halving_keeps_the_best_third_and_counts_every_run(
    monkeypatch):
  study = cells.Study("digits", alphas=[0.1], devices=["heterogeneous"],
                        local_work=["deadline"], comm=[1.0], seeds=[0],
                        tuning=[100, 101], batches=[4, 8, 16, 32, 64, 128],
                        lr_factors=[0.5, 2], methods=[],
                        aggregations=["fednova"], rounds=90, halving=True,
                        log=lambda m: None)
  assert study.rungs() == [10, 30, 90]
  # 12 points, then 4, then 2, on 2 tuning seeds; 1 reported run
  assert study.total_runs() == (12 + 4 + 2) * 2 + 1
  calls = []

  def fake(base, exps, cache_dir, key, retimes, log, seconds):
    calls.append((key, base.rounds, sorted({json.dumps(json.loads(
        e["id"])[1]) for e in exps})))
    out = []
    for e in exps:
      cell, p, s = json.loads(e["id"])
      b, lr = p
      # accuracy is best at batch 8 and rate 0.2, and grows with rounds
      acc = 0.9 - 0.01 * abs(math.log2(b / 8)) - 0.1 * abs(lr - 0.2)
      acc *= base.rounds / 90
      R = base.rounds
      out.append(dict(id=e["id"], rounds=[0, R // 2, R],
                      accuracy=[0.1, 0.96 * acc, acc], final_accuracy=acc,
                      sim_time={"run": [0.0, R / 2, float(R)]},
                      examples=1, bytes=1, noise_scale=[]))
    return out
  monkeypatch.setattr(cells, "run_sweep_cached", fake)
  runs = study.tune()
  assert [(k, r, len(p)) for k, r, p in calls] == [
      ("tune-deadline-fednova-fixed-rung10", 10, 12),
      ("tune-deadline-fednova-fixed-rung30", 30, 4),
      ("tune-deadline-fednova-fixed", 90, 2)]
  # batch 8 at rate 0.2 and, of the tied 4 and 16, the smaller
  assert calls[-1][2] == ["[4, 0.2]", "[8, 0.2]"]
  (t,) = report.tune(runs, study.batches).values()
  assert t["tuned"]["fednova"]["batch"] == 8
  assert t["tuned"]["fednova"]["lr"] == pytest.approx(0.2)
  # the target from the full-length runs only; every run is tuning cost
  assert t["target"] == pytest.approx(0.95 * 0.9)
  assert t["tuning_cost"]["runs"] == (12 + 4 + 2) * 2
  assert t["tuning_cost"]["sim_time_s"] == pytest.approx(
      2 * (12 * 10 + 4 * 30 + 2 * 90))
  assert len(t["tuning_curve"]) == 2        # the points that ran in full
