"""The package's layering, checked statically (pure `ast`; nothing of ldm_jax is imported).

Every module under ldm_jax/ is parsed and all of its imports of ``ldm_jax.*`` are collected: module level and
function scope (imports inside ``def __getattr__`` lazy re-exports included; they are real dependencies),
``import x``, ``from x import y``, relative imports, and ``from ldm_jax.pkg import name`` where `name` is a
submodule counts as importing that submodule. Each module maps to a layer of `LAYERS`; a module may import its
own layer and lower ones only, and the module import graph has no cycles (within a subpackage too).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

# The layer table; the README's layout section describes it. Lowest first: a module may import modules of its
# own layer and of lower layers only. Keys are module names or package prefixes (the longest match wins).
LAYERS: dict[str, int] = {
    "ldm_jax.types": 0,
    "ldm_jax._xla_cpu": 0,
    "ldm_jax.images": 0,
    "ldm_jax.configlib": 0,  # may import ldm_jax.types only (RESTRICTED below)
    "ldm_jax.diffusion": 1,  # pure math: ldm_jax.types and itself only
    "ldm_jax.models": 2,  # Flax modules; never training / data / ldm / eval, never ml_collections
    "ldm_jax.convert": 3,
    "ldm_jax.data": 4,
    "ldm_jax.ldm": 5,  # the model layer: LatentDiffusion
    "ldm_jax.eval": 6,
    "ldm_jax.training": 7,
    "ldm_jax.sweeps": 8,
    "ldm_jax.pipelines": 9,
    "ldm_jax.commands": 10,  # entry points
    "ldm_jax.cli": 10,
    "ldm_jax.main": 10,
    "ldm_jax.__main__": 10,
    "ldm_jax": 10,  # ldm_jax/__init__.py: the top-level package re-exports lazily, like an entry point
}
# Modules whose allowed ldm_jax imports are narrower than their layer's: prefix -> allowed prefixes.
RESTRICTED: dict[str, tuple[str, ...]] = {
    "ldm_jax.configlib": ("ldm_jax.types",),
    "ldm_jax.diffusion": ("ldm_jax.types", "ldm_jax.diffusion"),
}
# Entry points: the only modules that may raise SystemExit or use absl's flags / app.
ENTRY = ("ldm_jax.commands", "ldm_jax.cli", "ldm_jax.main", "ldm_jax.__main__")
# Layers that may import ml_collections (configlib in layer 0, then the model layer and above).
ML_COLLECTIONS_OK = ("ldm_jax.configlib",)
ML_COLLECTIONS_MIN_LAYER = 5
ABSL_ENTRY_ONLY = ("absl.flags", "absl.app")
# Named exceptions to ABSL_ENTRY_ONLY, each with its reason.
ABSL_FLAGS_EXCEPTIONS = {
    "ldm_jax.data._grain_compat": "grain's reader processes read absl flags; it marks them parsed outside absl.app",
}

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ldm_jax"


@dataclass(frozen=True)
class Import:
    file: str  # relative to the repository root
    line: int
    module: str  # the importing module
    target: str  # the imported module (ldm_jax.* resolved to a module or package; else the dotted name)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _all_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = _all_modules()


def _resolve(name: str) -> str:
    """The longest existing module or package that `name` (a dotted path) names or lies in."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in MODULES:
            return candidate
        parts.pop()
    return name


def _imports(path: Path) -> list[Import]:
    """Every import statement of `path`, at any depth (functions, classes, `if TYPE_CHECKING`, ...)."""
    module = _module_name(path)
    package = module if _is_package(path) else module.rpartition(".")[0]
    rel = str(path.relative_to(ROOT))
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [Import(rel, node.lineno, module, _resolve(a.name)) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in MODULES or not (source == "ldm_jax" or source.startswith("ldm_jax.")):
                    target = sub  # a submodule of ours, or third-party (`from absl import flags` -> absl.flags)
                else:
                    target = _resolve(source)  # a name from an ldm_jax module or package __init__
                out.append(Import(rel, node.lineno, module, target))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            out.append(Import(rel, node.lineno, module, _resolve(node.args[0].value)))  # importlib, constant name
    return out


ALL_IMPORTS = {name: _imports(path) for name, path in MODULES.items()}


def _prefix_match(name: str, prefixes) -> str | None:
    best = None
    for p in prefixes:
        if (name == p or name.startswith(p + ".")) and (best is None or len(p) > len(best)):
            best = p
    return best


def layer(module: str) -> int:
    if module == "ldm_jax":
        return LAYERS["ldm_jax"]
    key = _prefix_match(module, [k for k in LAYERS if k != "ldm_jax"])
    assert key is not None, f"{module} has no entry in LAYERS; add it to the table (and the README's layout)"
    return LAYERS[key]


def _internal(imp: Import) -> bool:
    return imp.target == "ldm_jax" or imp.target.startswith("ldm_jax.")


def _report(problems: list[str], what: str) -> None:
    if problems:
        pytest.fail(f"{len(problems)} {what}:\n  " + "\n  ".join(problems), pytrace=False)


# ---------------------------------------------------------------------------------------------------- tests
def test_every_module_has_a_layer():
    assert len(MODULES) > 20, f"found only {len(MODULES)} modules under {PACKAGE}"
    for name in MODULES:
        layer(name)


def test_no_upward_imports():
    problems = []
    for name, imports in ALL_IMPORTS.items():
        own = layer(name)
        restricted = _prefix_match(name, RESTRICTED)
        for imp in filter(_internal, imports):
            if imp.target == "ldm_jax" and name.startswith("ldm_jax."):
                problems.append(f"{imp.file}:{imp.line}: {name} imports the top-level package 'ldm_jax' "
                                "(import the subpackage it needs)")
            elif layer(imp.target) > own:
                problems.append(f"{imp.file}:{imp.line}: {name} (layer {own}) imports {imp.target} "
                                f"(layer {layer(imp.target)})")
            elif restricted and not _prefix_match(imp.target, RESTRICTED[restricted]):
                problems.append(f"{imp.file}:{imp.line}: {name} imports {imp.target}; {restricted} may import "
                                f"only {', '.join(RESTRICTED[restricted])}")
    _report(problems, "imports pointing up the layer order")


def _find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle path per strongly connected component of more than one module (or a self-import)."""
    index, low, stack, on_stack, comps = {}, {}, [], set(), []

    def strongconnect(v):  # Tarjan; recursion depth is at most the number of modules
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    cycles = []
    for comp in comps:
        members = set(comp)
        if len(comp) == 1 and comp[0] not in graph.get(comp[0], ()):
            continue
        start = min(comp)  # shortest path back to start inside the component (BFS)
        prev, frontier, found = {start: None}, [start], None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & members):
                    if w == start:
                        found = v
                        break
                    if w not in prev:
                        prev[w] = v
                        nxt.append(w)
                if found is not None:
                    break
            frontier = nxt
        path, v = [start], found
        while v is not None and v != start:
            path.insert(1, v)
            v = prev[v]
        cycles.append([*path, start])
    return cycles


def test_no_import_cycles():
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    where: dict[tuple[str, str], Import] = {}
    for name, imports in ALL_IMPORTS.items():
        for imp in filter(_internal, imports):
            if imp.target == name or imp.target not in MODULES:
                continue
            # A package's __init__ importing its own submodules is how re-exports work; the reverse edge
            # (submodule -> own package __init__) is what closes a cycle, and it is kept.
            graph[name].add(imp.target)
            where.setdefault((name, imp.target), imp)
    problems = []
    for cycle in _find_cycles(graph):
        steps = [f"{a} -> {b} ({where[a, b].file}:{where[a, b].line})" for a, b in zip(cycle, cycle[1:])]
        problems.append("cycle " + " -> ".join(cycle) + "\n      " + "\n      ".join(steps))
    _report(problems, "import cycles")


def test_system_exit_and_absl_flags_only_in_entry_points():
    problems = []
    for name, path in MODULES.items():
        if _prefix_match(name, ENTRY):
            continue
        rel = path.relative_to(ROOT)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Name) and node.id == "SystemExit":
                problems.append(f"{rel}:{node.lineno}: {name} uses SystemExit (raise an exception; entry points "
                                "turn errors into exit codes)")
        for imp in ALL_IMPORTS[name]:
            if _prefix_match(imp.target, ABSL_ENTRY_ONLY) and name not in ABSL_FLAGS_EXCEPTIONS:
                problems.append(f"{imp.file}:{imp.line}: {name} imports {imp.target} (entry points only)")
    _report(problems, "entry-point-only constructs outside the entry points")


def test_ml_collections_only_in_config_and_upper_layers():
    problems = []
    for name, imports in ALL_IMPORTS.items():
        if _prefix_match(name, ML_COLLECTIONS_OK) or layer(name) >= ML_COLLECTIONS_MIN_LAYER:
            continue
        for imp in imports:
            if imp.target == "ml_collections" or imp.target.startswith("ml_collections."):
                problems.append(f"{imp.file}:{imp.line}: {name} (layer {layer(name)}) imports {imp.target}")
    _report(problems, "ml_collections imports below the model layer")


# ----------------------------------------------------------------------------------- the checker's own logic
def test_collector_resolves_relative_submodule_and_function_scope_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "ldm_jax" / "models"
    pkg.mkdir(parents=True)
    (tmp_path / "ldm_jax" / "__init__.py").write_text("")
    (tmp_path / "ldm_jax" / "types.py").write_text("")
    (tmp_path / "ldm_jax" / "convert").mkdir()
    (tmp_path / "ldm_jax" / "convert" / "__init__.py").write_text("")
    (tmp_path / "ldm_jax" / "convert" / "hf.py").write_text("")
    (pkg / "__init__.py").write_text("def __getattr__(name):\n    from ldm_jax.convert import hf\n    return hf\n")
    (pkg / "a.py").write_text(
        "from .. import types\nfrom . import b\nfrom .b import thing\nimport ldm_jax.convert.hf as h\n"
        "def f():\n    from ldm_jax import convert\n    import importlib\n"
        "    return importlib.import_module('ldm_jax.types')\n")
    (pkg / "b.py").write_text("")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    monkeypatch.setitem(globals(), "MODULES", {_module_name(p): p for p in (tmp_path / "ldm_jax").rglob("*.py")})
    got = sorted((i.line, i.target) for i in _imports(pkg / "a.py"))
    assert got == [(1, "ldm_jax.types"), (2, "ldm_jax.models.b"), (3, "ldm_jax.models.b"),
                   (4, "ldm_jax.convert.hf"), (6, "ldm_jax.convert"), (7, "importlib"), (8, "ldm_jax.types")]
    (pkg / "c.py").write_text("from absl import flags, logging\nfrom ml_collections import config_dict\n")
    assert [i.target for i in _imports(pkg / "c.py")] == ["absl.flags", "absl.logging", "ml_collections.config_dict"]
    assert [i.target for i in _imports(pkg / "__init__.py")] == ["ldm_jax.convert.hf"]


def test_cycle_finder_reports_the_path():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert sorted(_find_cycles(graph)) == [["a", "b", "c", "a"], ["e", "e"]]
    assert _find_cycles({"a": {"b"}, "b": set()}) == []
