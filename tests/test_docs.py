"""The documentation cannot drift from the code.

* ``docs/extending.md``: every block fenced exactly as ```` ```python ````
  runs, in order, in one namespace (blocks fenced ``python no-run``,
  ``diff``, ``bash``, ... are shown, not run); its diff to
  ``fedjax_bsa/core/config.py`` applies to the current file and adds a traced,
  sweepable setting; its diff to its own example matches the example.
* ``docs/design.md``: every backquoted dotted name rooted at a
  ``fedjax_bsa`` module (``fedjax_bsa.kernel.Jobs``, ``kernel.Jobs``,
  ``algorithms.base.Algorithm``) resolves, and every backquoted path to a
  file of the repository exists.
"""

import glob
import importlib
import importlib.util
import os
import pkgutil
import re
import sys

import pytest

import fedjax_bsa
from fedjax_bsa.core import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXTENDING = os.path.join(ROOT, "docs", "extending.md")
DESIGN = os.path.join(ROOT, "docs", "design.md")
_FILE_TYPES = ("py", "json", "jsonl", "npz", "md", "txt", "yaml")
_FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```[ \t]*$", re.M | re.S)


def _blocks(path):
  """``(info, body)`` of every fenced block of a markdown file, in order."""
  with open(path) as fh:
    return [(m.group(1).strip(), m.group(2))
            for m in _FENCE.finditer(fh.read())]


def _runnable(path):
  return [body for info, body in _blocks(path) if info == "python"]


def _diffs(path):
  return [body for info, body in _blocks(path) if info == "diff"]


def _hunks(diff: str):
  """``(old_lines, new_lines)`` per hunk; checks the ``@@`` line counts."""
  out = []
  for part in re.split(r"^@@", diff, flags=re.M)[1:]:
    head, _, body = part.partition("\n")
    counts = re.match(r" -\d+(?:,(\d+))? \+\d+(?:,(\d+))? @@", head)
    old, new = [], []
    for line in body.splitlines():
      tag, text = line[:1], line[1:]
      if tag in (" ", "-"):
        old.append(text)
      if tag in (" ", "+"):
        new.append(text)
    if counts:
      assert (len(old), len(new)) == tuple(
          int(c or 1) for c in counts.groups()), f"bad @@ counts: {head}"
    out.append((old, new))
  return out


@pytest.fixture
def registries():
  """Restores every registry after the page's registrations."""
  regs = registry.all_registries().values()
  saved = [(r, dict((n, r.get(n)) for n in r.names())) for r in regs]
  yield
  for r, items in saved:
    r._items.clear()  # pylint: disable=protected-access
    r._items.update(items)  # pylint: disable=protected-access


def test_extending_examples_run(registries):
  del registries
  blocks = _runnable(EXTENDING)
  assert len(blocks) >= 8, "the page lost its runnable examples"
  ns = {"__name__": "docs_extending"}
  for i, body in enumerate(blocks):
    try:
      exec(compile(body, f"docs/extending.md[python block {i}]", "exec"),
           ns)  # pylint: disable=exec-used
    except Exception as e:  # pylint: disable=broad-except
      pytest.fail(f"python block {i} of docs/extending.md failed: "
                  f"{type(e).__name__}: {e}\n---\n{body}")
  for name, reg in (("fedavg_clipped", registry.ALGORITHMS),
                    ("sgd_decay", registry.SERVER_OPTIMIZERS),
                    ("data_proportional", registry.CONTROLLERS),
                    ("table", registry.DATASETS)):
    assert name in reg, f"the page no longer registers {name}"


def _config_diff():
  for d in _diffs(EXTENDING):
    if d.startswith("--- a/fedjax_bsa/core/config.py"):
      return d
  raise AssertionError("docs/extending.md has no diff of config.py")


def test_config_diff_applies_and_adds_a_traced_setting(tmp_path):
  with open(os.path.join(ROOT, "fedjax_bsa", "core", "config.py")) as fh:
    src = fh.read()
  for old, new in _hunks(_config_diff()):
    old_text, new_text = "\n".join(old) + "\n", "\n".join(new) + "\n"
    assert src.count(old_text) == 1, (
        "the config.py diff of docs/extending.md no longer applies:\n"
        + old_text)
    src = src.replace(old_text, new_text)
  path = tmp_path / "config_with_clip_norm.py"
  path.write_text(src)
  spec = importlib.util.spec_from_file_location("config_with_clip_norm",
                                                path)
  mod = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = mod  # dataclasses look their module up
  try:
    spec.loader.exec_module(mod)
  finally:
    del sys.modules[spec.name]
  assert "clip_norm" in mod.TRACED and "clip_norm" in mod.SWEEPABLE
  hp = mod.hparams(mod.Config())
  assert hp["clip_norm"].dtype.name == "float32"
  assert float(hp["clip_norm"]) == 0.5
  assert float(mod.hparams(mod.Config().replace(clip_norm="0.1"))[
      "clip_norm"]) == pytest.approx(0.1)
  with pytest.raises(mod.ConfigError, match="clip_norm=0.0"):
    mod.Config().replace(clip_norm=0.0)
  assert "clip_norm" in mod.Config.describe()


def test_example_diff_matches_the_example():
  code = "\n".join(_runnable(EXTENDING))
  own = [d for d in _diffs(EXTENDING) if d.startswith("--- example")]
  assert own, "docs/extending.md has no diff of its own example"
  for d in own:
    for old, _ in _hunks("@@\n" + d.split("\n", 2)[2]):
      assert "\n".join(old) in code, (
          "a diff of docs/extending.md no longer matches its example:\n"
          + "\n".join(old))


# ---------------------------------------------------------------- design


def _modules() -> set:
  names = {"fedjax_bsa"}
  for m in pkgutil.walk_packages(fedjax_bsa.__path__, "fedjax_bsa."):
    names.add(m.name)
  return names


def _leaves(modules: set) -> dict:
  """A module's last name -> its full name, for names used once
  (`config` -> `fedjax_bsa.core.config`)."""
  seen = {}
  for m in modules:
    seen.setdefault(m.rsplit(".", 1)[-1], []).append(m)
  return {k: v[0] for k, v in seen.items() if len(v) == 1}


def _resolve(dotted: str, modules: set) -> bool:
  """Whether ``dotted`` (``fedjax_bsa.`` optional; a module may be named by
  its last name, `config.Config`) names something real."""
  parts = dotted.split(".")
  if parts[0] != "fedjax_bsa":
    if ("fedjax_bsa." + parts[0]) not in modules and parts[0] in _leaves(
        modules):
      parts = _leaves(modules)[parts[0]].split(".") + parts[1:]
    else:
      parts = ["fedjax_bsa"] + parts
  for cut in range(len(parts), 0, -1):
    mod_name = ".".join(parts[:cut])
    if mod_name in modules:
      obj = importlib.import_module(mod_name)
      for attr in parts[cut:]:
        if not hasattr(obj, attr):
          return False
        obj = getattr(obj, attr)
      return True
  return False


def _design_spans():
  with open(DESIGN) as fh:
    text = fh.read()
  text = _FENCE.sub("", text)  # code blocks are examples, not references
  spans = []
  for span in re.findall(r"`([^`]+)`", text):  # may wrap across lines
    span = re.sub(r"\.\s+", ".", re.sub(r"\s+", " ", span.strip()))
    call = re.match(r"^([\w.]+)\(", span)    # `experiment.build(cfg)`
    spans.append(call.group(1) if call else span)
  return spans


def test_design_names_exist():
  modules = _modules()
  short = {m.split(".", 1)[1].split(".")[0] for m in modules if "." in m}
  short |= set(_leaves(modules))
  dotted = re.compile(r"^(?:fedjax_bsa\.)?[a-z_]+(?:\.[A-Za-z_]\w*)+$")
  checked, missing = 0, []
  for span in _design_spans():
    name = span
    if not dotted.match(name) or name.rsplit(".", 1)[1] in _FILE_TYPES:
      continue  # not a name, or a file name (`config.json`, `plans.py`)
    head = name.split(".")[1 if name.startswith("fedjax_bsa.") else 0]
    if head not in short:
      continue  # cfg.rounds, jax.lax.cond, optax.sgd, ...
    checked += 1
    if not _resolve(name, modules):
      missing.append(span)
  assert checked >= 40, f"only {checked} names checked in docs/design.md"
  assert not missing, f"docs/design.md names what does not exist: {missing}"


def test_design_paths_exist():
  spans = _design_spans()
  paths = [s for s in spans
           if re.match(r"^(fedjax_bsa|docs|tests|benchmarks)/[\w./]+$", s)]
  # a bare module file (`round_plan.py`) is one of the package's
  package = os.path.join(ROOT, "fedjax_bsa")
  for s in spans:
    if re.match(r"^\w+\.py$", s):
      found = sorted(glob.glob(os.path.join(package, "**", s), recursive=True))
      paths.append(os.path.relpath(found[0], ROOT) if found
                   else os.path.join("fedjax_bsa", s))
  assert len(paths) >= 5, "docs/design.md names too few files"
  missing = [p for p in paths if not os.path.exists(os.path.join(ROOT, p))]
  assert not missing, f"docs/design.md names missing files: {missing}"
