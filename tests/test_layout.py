"""The house: imports between the package's modules point one way.

Every import counts, at module level or inside a function, since a lazy import is still a
dependency. The model may build on its loaders and its decoder (they are its base classes); they
must not reach back for it.
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Each folder of the checkout and the name it installs under (setup.cfg's package_dir).
PACKAGES = {"tracer": "gpt2_jit.tracer", "kernels": "gpt2_jit.kernels", "gpt2": "gpt2"}


def module_imports(path, package_modules):
    """The package modules a file imports, anywhere in it."""
    found = set()
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found.update(n for n in names if n in package_modules)
    return found


def import_graph():
    files = {}
    for folder, pkg in PACKAGES.items():
        for name in os.listdir(os.path.join(ROOT, folder)):
            if name.endswith(".py"):
                mod = pkg if name == "__init__.py" else f"{pkg}.{name[:-3]}"
                files[mod] = os.path.join(ROOT, folder, name)
    return {mod: module_imports(path, set(files)) - {mod} for mod, path in files.items()}


def find_cycle(graph):
    """A list of modules forming an import cycle, or None (package __init__ files excluded: they
    gather the public names and are imported by nothing inside)."""
    packages = set(PACKAGES.values())
    graph = {m: {d for d in deps if d not in packages} for m, deps in graph.items()
             if m not in packages}
    state = {}

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                return path[path.index(d):] + [d]
            if d not in state:
                cycle = visit(d, path + [d])
                if cycle:
                    return cycle
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m, [m])
            if cycle:
                return cycle
    return None


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None


def is_gpt2(module):
    return module.split(".")[0] == "gpt2"


def test_arrows_point_down():
    """kernels imports neither tracer nor gpt2; tracer does not import gpt2."""
    graph = import_graph()
    for mod, deps in graph.items():
        if mod.startswith("gpt2_jit.kernels"):
            assert not {d for d in deps if d.startswith("gpt2_jit.tracer") or is_gpt2(d)}, mod
        if mod.startswith("gpt2_jit.tracer"):
            assert not {d for d in deps if is_gpt2(d)}, mod


@pytest.mark.parametrize("module", ["gpt2.loading", "gpt2.generate", "gpt2.checkpoints",
                                    "gpt2.evaluate", "gpt2.config"])
def test_helpers_do_not_reach_back_for_the_model(module):
    assert "gpt2.model" not in import_graph()[module]


def test_cycle_finder_finds_a_cycle():
    """Negative control: the old layout (model -> generate -> model) is caught."""
    graph = import_graph()
    graph["gpt2.generate"] = graph["gpt2.generate"] | {"gpt2.model"}
    cycle = find_cycle(graph)
    assert cycle is not None and "gpt2.model" in cycle and "gpt2.generate" in cycle
