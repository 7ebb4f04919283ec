"""The package's import graph: no cycle, no arrow up a layer, function-level imports only where the reason below
says so, and the environment read in one module.

Read from the source (every `import` statement, at module level or inside a function), so an import that only
runs on some path counts as much as one at the top: a cycle held together by a function-level import still
breaks when the modules are imported in another order.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dlscale"

# Lower layers never import higher ones (by module-name prefix, the longest prefix deciding).
LAYERS = [
    ("dlscale.version", "dlscale.io", "dlscale.registry", "dlscale.configtree", "dlscale.distributed",
     "dlscale.recipes", "dlscale.formats", "dlscale.data.classes"),                 # foundations
    ("dlscale.data", "dlscale.sim", "dlscale.preemption", "dlscale.metrics", "dlscale.figures",
     "dlscale.summaries", "dlscale.collect"),                                       # data, simulation, metrics
    ("dlscale.models", "dlscale.compat", "dlscale.export"),                         # networks and their files
    ("dlscale.train",),                                                             # the engine
    ("dlscale.transfer", "dlscale.sweep", "dlscale.predict", "dlscale.predict_inputs"),   # what uses the engine
    ("dlscale.quickstart", "dlscale.quickstart_config", "dlscale.quickstart_report", "dlscale.cli",
     "dlscale"),                                                                    # entry points
]

# Function-level imports of dlscale modules, each with its reason (module -> imported modules).
LAZY = {
    # `import dlscale` (and every reader process's `import dlscale.data...`) must not pull in torchvision and timm
    "dlscale": {"dlscale.export"},
    # a command imports only its own subcommand: ray (tune), deepspeed (train) and lenstronomy-free simulation
    # start in seconds each, and `dlscale pack` must not wait for them
    "dlscale.cli": {"dlscale.data.pack", "dlscale.data.shards", "dlscale.sim", "dlscale.train", "dlscale.train.adabn",
                    "dlscale.predict", "dlscale.quickstart", "dlscale.transfer.cli", "dlscale.sweep"},
    # numba (the host row writer's compiler) only where images are transformed on the host: a GPU node transforming
    # them on the device may not have it
    "dlscale.data.stream": {"dlscale.data.rowwrite"},
}
# Function-level imports of other packages: optional or heavy dependencies, imported where they are used.
LAZY_THIRD_PARTY = {"ray", "optuna", "peft", "geomloss", "escnn", "lenstronomy", "deepspeed", "timm", "safetensors",
                    "torchvision", "matplotlib", "scipy", "torchjd", "webdataset", "torch", "tensorboard", "yaml",
                    "socket", "shlex", "nbformat", "nbclient", "torchmetrics", "sklearn", "numpy"}


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def imports(name: str, path: Path, known: dict) -> list[tuple[str, int, bool]]:
    """(imported dlscale module, line, at module level) of every import statement of one module; `from pkg import
    x` counts as an import of the submodule pkg.x where x is one."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        out += [(t, node.lineno, id(node) in top) for t in targets]
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {t for t, _, _ in imports(name, path, known) if t in known} for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def layer(name: str) -> int:
    matches = [(len(prefix), i) for i, group in enumerate(LAYERS) for prefix in group
               if name == prefix or name.startswith(prefix + ".")]
    assert matches, f"{name}: in no layer of LAYERS; add it where it belongs"
    return max(matches)[1]


def test_the_package_has_no_import_cycle():
    assert cycles(graph()) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_from_a_higher_layer():
    upward = [f"{name} (layer {layer(name)}) imports {t} (layer {layer(t)})"
              for name, targets in graph().items() for t in sorted(targets) if layer(t) > layer(name)]
    assert upward == []


def test_function_level_imports_are_the_listed_lazy_ones():
    known, unexplained = modules(), []
    for name, path in known.items():
        for target, line, at_top in imports(name, path, known):
            if at_top:
                continue
            if target.startswith("dlscale"):
                if target not in LAZY.get(name, set()):
                    unexplained.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
            elif target.partition(".")[0] not in LAZY_THIRD_PARTY:
                unexplained.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert unexplained == []


def test_the_environment_is_read_and_set_in_one_module():
    touching = sorted(str(path.relative_to(PACKAGE.parent)) for path in PACKAGE.rglob("*.py")
                      if re.search(r"os\.(environ|getenv|putenv|unsetenv)\b", path.read_text()))
    assert touching == ["dlscale/distributed.py"]
