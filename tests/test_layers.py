"""The package's import graph points one way: each package imports only packages of lower layers, there is no
import circle between modules, and no lum_dist import is hidden inside a function to dodge one."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lum_dist"
# Lower layers first. A package may import its own modules and those of strictly lower layers.
LAYERS = [
    {"config", "utils", "cli"},  # run configs, small helpers, the entry points' shared error handling
    {"data", "kernels"},  # raw file -> prepared dataset -> tokens -> packed batches; Triton sources
    {"ops"},  # attention and group-query operators
    {"model", "losses", "eval", "parallel"},  # models, the loss, pure metrics, everything DeepSpeed
    {"checkpoint"},  # what a checkpoint is and the model it describes
    {"train", "query", "downstream", "scaling"},  # step 1, step 2, step 3, sweeps
    {"testing"},  # helpers for the tests
]
LAYER = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}
# Imports that must happen on first use, each for a reason other than an import cycle.
DEFERRED = {("lum_dist.ops.group_query", "lum_dist.kernels.group_attention")}  # Triton optional, TRITON_INTERPRET


def modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "lum_dist"


def imports(module: str, path: Path) -> list[tuple[str, bool]]:
    """(imported lum_dist module, at module level?) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    top = set()
    for node in tree.body:  # module level, outside `if TYPE_CHECKING:` blocks
        top.update(id(n) for n in ast.walk(node) if not (isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test)))
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            base = node.module
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        out += [(n, id(node) in top) for n in names if n == "lum_dist" or n.startswith("lum_dist.")]
    return out


MODULES = modules()


def test_every_package_has_a_layer():
    assert {package(m) for m in MODULES} - {"lum_dist"} <= set(LAYER)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_and_none_is_hidden(module):
    src = package(module)
    for target, at_top in imports(module, MODULES[module]):
        dst = package(target)
        if dst == "lum_dist" or dst == src:
            continue
        assert LAYER[dst] < LAYER[src], f"{module} imports {target}: layer {dst} is not below {src}"
        assert at_top or (module, target) in DEFERRED, f"{module} imports {target} inside a function"


def test_no_import_circle_between_modules():
    graph = defaultdict(set)
    for module, path in MODULES.items():
        for target, at_top in imports(module, path):
            if at_top and target in MODULES and target != module:
                graph[module].add(target)
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = path[path.index(n):] + [n] if n in path else [m, n]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m, [m])


def test_eval_is_pure():
    for module, path in MODULES.items():
        if package(module) == "eval":
            assert not {package(t) for t, _ in imports(module, path)} & {"train", "model", "checkpoint", "parallel"}


def test_kernels_folder_never_shadows_the_pypi_kernels_package():
    """From the repository root (sys.path[0] under ``python -m`` and ``python -c``), ``import kernels`` must not
    find the Triton folder as a regular package: transformers imports the PyPI ``kernels`` project when it is
    installed (it depends on it from 5.25), and a shadowing folder breaks ``import transformers.modeling_utils``.
    The Triton sources still import as ``lum_dist.kernels``."""
    code = ("import importlib.util, lum_dist.kernels.group_attention as g, transformers.modeling_utils; "
            "s = importlib.util.find_spec('kernels'); print(g.__name__, s.origin if s else None)")
    out = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    name, origin = out.stdout.split()
    assert name == "lum_dist.kernels.group_attention"
    assert origin == "None" or not origin.startswith(str(PACKAGE.parent / "kernels")), origin
