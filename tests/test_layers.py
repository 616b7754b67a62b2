"""The package's layers (docs/design.md, "Layers"): which folder may import
which, no import circles, no private names across folders, and the size
rules (at most four files at the top of the package, modules of at most
400 lines); the benchmarks' rule (docs/design.md, section 11): one
subpackage of ``bench`` per benchmark, sharing only ``bench.harness``, and
nothing in the package importing FedJAX or Haiku. The import graph is read
from the source with ``ast``, every ``import`` counted, those inside
functions too."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "fedjax_bsa"

# A folder may import its own modules and any folder of a lower rank. Only
# bench has subfolders (one per benchmark); they share its rank.
RANKS = {"core": 0, "data": 1, "algorithms": 1, "kernel": 2, "plans": 3,
         "setup": 4, "report": 5, "run": 6, "bench": 7, "": 8}


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path):
  """(imported module, imported name or None, line) for every import of
  the package in ``path``."""
  tree = ast.parse(path.read_text())
  is_pkg = path.name == "__init__.py"
  here = _module_name(path).split(".")
  pkg = here if is_pkg else here[:-1]
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name.split(".")[0] == "fedjax_bsa":
          yield a.name, None, node.lineno
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = pkg[:len(pkg) - node.level + 1]
        mod = ".".join(base + ([node.module] if node.module else []))
      else:
        mod = node.module or ""
      if mod.split(".")[0] != "fedjax_bsa":
        continue
      for a in node.names:
        yield mod, a.name, node.lineno


def _modules():
  return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(mod: str, name, modules) -> str:
  """The module an import reaches: ``from a import b`` is module ``a.b``
  when that is a module, else ``a``."""
  if name is not None and f"{mod}.{name}" in modules:
    return f"{mod}.{name}"
  return mod


def _folder(mod: str) -> str:
  """The layer of module ``mod``: the folder under ``fedjax_bsa`` that holds
  it (``fedjax_bsa.bench.kernel.main`` is ``bench``'s), "" at the top."""
  parts = mod.split(".")
  if len(parts) == 1:
    return ""
  if len(parts) == 2 and parts[1] not in RANKS:
    return ""  # a top-level module (cli)
  return parts[1]


def _graph():
  modules = _modules()
  edges = {}
  for mod, path in modules.items():
    edges[mod] = [(_resolve(m, n, modules), n, line)
                  for m, n, line in _imports(path)]
  return modules, edges


def _packages():
  """Every package under ``fedjax_bsa``, as its path parts below it."""
  return {p.parent.relative_to(ROOT).parts for p in ROOT.rglob("*.py")}


def test_every_folder_has_a_rank():
  folders = {parts[0] for parts in _packages() if parts}
  assert folders <= set(RANKS), folders - set(RANKS)
  for parts in _packages():  # a package, as a folder too (no namespaces)
    assert (ROOT.joinpath(*parts) / "__init__.py").exists(), parts


def test_only_bench_has_subfolders_one_per_benchmark():
  nested = {parts for parts in _packages() if len(parts) > 1}
  assert all(parts[0] == "bench" and len(parts) == 2 for parts in nested), (
      nested)
  bench = ROOT / "bench"
  assert sorted(p.name for p in bench.glob("*.py")) == [
      "__init__.py", "harness.py"], "bench/ holds harness and benchmarks"
  for parts in nested:  # python -m fedjax_bsa.bench.<name>: main.main
    pkg = ROOT.joinpath(*parts)
    assert (pkg / "__main__.py").exists() and (pkg / "main.py").exists(), (
        pkg)
    assert "def main(" in (pkg / "main.py").read_text(), pkg


def _benchmark(mod: str) -> str | None:
  """The benchmark of a module of bench (``fedjax_bsa.bench.kernel.main``:
  ``kernel``); None for ``bench`` and ``bench.harness``."""
  parts = mod.split(".")
  if parts[:2] != ["fedjax_bsa", "bench"] or len(parts) < 3:
    return None
  return None if parts[2] == "harness" else parts[2]


def test_a_benchmark_imports_no_other_benchmark():
  _, edges = _graph()
  bad = [f"{mod}:{line} imports {target}"
         for mod, outs in edges.items() for target, _, line in outs
         if _benchmark(mod) and _benchmark(target)
         and _benchmark(target) != _benchmark(mod)]
  assert not bad, "\n".join(bad)


_FOREIGN = ("fedjax", "haiku")


def _foreign_imports(source: str, name: str = "<source>"):
  """``(module, line)`` of every import of FedJAX or Haiku in ``source``
  (``fedjax``, ``fedjax.algorithms``, ``haiku``; not ``fedjax_bsa``)."""
  out = []
  for node in ast.walk(ast.parse(source, name)):
    if isinstance(node, ast.Import):
      mods = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and not node.level:
      mods = [node.module or ""]
    else:
      continue
    out += [(m, node.lineno) for m in mods if m.split(".")[0] in _FOREIGN]
  return out


def test_the_package_imports_neither_fedjax_nor_haiku():
  assert _foreign_imports("import fedjax\nfrom fedjax.algorithms import "
                          "fed_avg\nimport haiku as hk\nimport fedjax_bsa\n"
                          "from fedjax_bsa import bench\n") == [
                              ("fedjax", 1), ("fedjax.algorithms", 2),
                              ("haiku", 3)]
  bad = [f"{p.relative_to(ROOT.parent)}:{line} imports {m}"
         for p in sorted(ROOT.rglob("*.py"))
         for m, line in _foreign_imports(p.read_text(), str(p))]
  assert not bad, "\n".join(bad)


def test_no_import_from_a_higher_or_sibling_layer():
  _, edges = _graph()
  bad = []
  for mod, outs in edges.items():
    src = _folder(mod)
    for target, _, line in outs:
      dst = _folder(target)
      if dst == src or target == "fedjax_bsa":
        continue
      if RANKS[dst] >= RANKS[src]:
        bad.append(f"{mod}:{line} imports {target}")
  assert not bad, "\n".join(bad)


def test_no_private_name_across_folders():
  _, edges = _graph()
  bad = [f"{mod}:{line} imports {target}.{name}"
         for mod, outs in edges.items() for target, name, line in outs
         if name and name.startswith("_") and _folder(target) != _folder(mod)]
  assert not bad, "\n".join(bad)


def test_no_import_circles():
  modules, edges = _graph()
  graph = {m: {t for t, _, _ in outs if t in modules and t != m}
           for m, outs in edges.items()}
  # A package's face importing its own modules is not a circle back to it.
  for m in graph:
    graph[m] = {t for t in graph[m] if not m.startswith(t + ".")}
  state, stack, circles = {}, [], []

  def visit(m):
    state[m] = 1
    stack.append(m)
    for t in sorted(graph[m]):
      if state.get(t) == 1:
        circles.append(stack[stack.index(t):] + [t])
      elif t not in state:
        visit(t)
    stack.pop()
    state[m] = 2

  for m in sorted(graph):
    if m not in state:
      visit(m)
  assert not circles, "\n".join(" -> ".join(c) for c in circles)


def test_the_checker_sees_a_bad_edge(tmp_path):
  # The graph reader resolves relative and absolute imports to modules.
  modules = {"fedjax_bsa.kernel.lanes": None, "fedjax_bsa.run.driver": None}
  assert _resolve("fedjax_bsa.run", "driver", modules) == \
      "fedjax_bsa.run.driver"
  assert _folder("fedjax_bsa.run.driver") == "run"
  assert _folder("fedjax_bsa.cli") == ""
  assert _folder("fedjax_bsa.bench.kernel.main") == "bench"
  assert _folder("fedjax_bsa.bench.harness") == "bench"
  assert _benchmark("fedjax_bsa.bench.kernel.main") == "kernel"
  assert _benchmark("fedjax_bsa.bench.harness") is None
  assert RANKS[_folder("fedjax_bsa.run.driver")] > RANKS[
      _folder("fedjax_bsa.kernel.lanes")]


def test_top_level_files():
  top = sorted(p.name for p in ROOT.glob("*.py"))
  assert len(top) <= 4, top


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_module_length(path):
  assert len(path.read_text().splitlines()) <= 400
