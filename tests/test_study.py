"""The time-to-accuracy study's quick mode runs and reports every field."""

import json

from fedjax_bsa.bench import study as time_to_accuracy


def test_study_quick_mode(tmp_path):
  assert time_to_accuracy.main(["--quick", "--out", str(tmp_path)]) == 0
  report = json.loads((tmp_path / "time_to_accuracy_quick.json").read_text())
  assert report["mode"] == "quick"
  cells = report["cells"]
  assert {c["method"] for c in cells} == {"fedavg_b32", "noise_scale"}
  for c in cells:
    for key in ("final_accuracy_mean", "cell_time_to_target_s",
                "cell_rounds_to_target", "examples", "bytes"):
      assert key in c
    assert c["final_accuracy_mean"] > 0.3   # chance is 0.1
    assert c["bytes"] > 0 and c["examples"] > 0
  # the per-cell target is 95% of the best final accuracy in the cell,
  # so at least the best method reaches it
  assert any(c["cell_reached"] == "1/1" for c in cells)
  assert (tmp_path / "time_to_accuracy_quick.md").exists()
