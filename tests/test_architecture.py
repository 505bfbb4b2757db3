"""The package map: no import cycle, no upward arrow between packages, light bottom layers.

Every module under ``src/post_training`` is read with ``ast`` (all its imports, those inside
functions included; ``if TYPE_CHECKING:`` blocks excluded) into a module-level import graph.
Importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first, so an import of a module also
counts as an import of its packages (except the importer's own packages, which are already being
imported). Then:

* the graph has no cycle;
* an arrow between two packages (``data_sft``, ``trainers``, or a top-level module such as
  ``frame``) points to a strictly lower layer of :data:`LAYERS`; modules of one package may
  import each other;
* an entrypoint (a module with a ``@hydra.main`` main, see :func:`entrypoints`) may import from
  any layer, and no module imports
  an entrypoint except an alias of :data:`ALIASES`, which only keeps an old ``python -m`` path
  working (ours run the new module with ``runpy``: Hydra then finds the configs as for the new
  path);
* ``import post_training.losses`` leaves ``transformers`` and ``tokenizers`` out, and
  ``import post_training`` imports nothing heavy.

The checker is tested on a small synthetic package too, so it cannot pass by finding nothing.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pytest

import post_training

PACKAGE = "post_training"
ROOT = Path(post_training.__file__).resolve().parent

# Lowest first. A package may import only from strictly lower layers (and from itself).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors",),  # the project's exceptions: imports nothing from the project
    ("utils", "losses"),  # config, run dirs, checkpoints, atomic writes; pure loss functions
    ("schema", "data_sft"),  # typed configs; SFT data: sources, mixtures, templates, tokens
    ("modeling", "data_preference"),  # tokenizer + model loading; preference pairs
    ("trainers",),  # the training loop and its loss-family subclasses
    # pipelines over the above; a run's plots; the --help listing
    ("data_alignment", "exact_match", "model_merging", "harness", "report", "config_help"),
    ("online",),  # online RL: the alignment pipeline's sampling and rewards + the loop
    ("assets",),  # task code that lm-eval loads by path (assets/tiny-tasks/lm-eval/utils.py)
    ("frame",),  # the run frame shared by the training entrypoints
    (
        "launch",
        "merge",
        "evaluate",
        "download",
        "config_reference",
        "train_sft",
        "train_preference",
        "train_reward",
        "train_online",
    ),
    ("submit",),  # one run to SLURM: the CLI over launch/submit
)

# Old entrypoint paths kept working: alias module -> the entrypoint whose ``main`` it calls.
ALIASES: dict[str, str] = {
    "post_training.model_merging.model_merging": "post_training.merge",
    "post_training.data_sft.dataset_mixture": "post_training.data_sft.build_mixture",
    "post_training.data_sft.dataset_split": "post_training.data_sft.build_split",
}


# --- The checker ------------------------------------------------------------------------------


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Dotted name -> file of every module of the package at ``root`` (``__init__`` = package)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join([package, *parts])] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk_runtime(node: ast.AST) -> Iterable[ast.AST]:
    """Every node under ``node`` except the bodies of ``if TYPE_CHECKING:`` blocks."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                yield other
                yield from _walk_runtime(other)
            continue
        yield child
        yield from _walk_runtime(child)


def imported_names(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """Dotted names a module imports (``from a import b`` gives ``a`` and ``a.b``: ``b`` may be
    a submodule); relative imports resolved."""
    out: set[str] = set()
    for node in _walk_runtime(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            out.add(source)
            out.update(f"{source}.{alias.name}" for alias in node.names)
    return out


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the project modules it imports (and their packages, see the module docs)."""
    modules = module_names(root, package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        own_packages = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
        targets = set()
        for imported in imported_names(tree, name, path.name == "__init__.py"):
            parts = imported.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix in modules and prefix not in own_packages:
                    targets.add(prefix)
        graph[name] = targets
    return graph


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def component(module: str) -> str:
    """The package (or top-level module) a module belongs to: ``post_training.data_sft.x`` ->
    ``data_sft``; the root package itself is ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


ENTRYPOINT_MAKERS = ("hydra.main", "entrypoint")
"""Callables that turn a function into a command-line main: Hydra's decorator, and the run
frame's wrapper of it (``post_training.frame.entrypoint``)."""


def entrypoints(root: Path, package: str) -> set[str]:
    """Modules that make a main at module level: a ``@hydra.main`` (or ``@entrypoint(...)``)
    function, or ``main = entrypoint(...)(run)``. (``frame`` itself only wraps, inside a
    function, so it is no entrypoint.)"""
    found = set()
    for name, path in module_names(root, package).items():
        for statement in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef):
                candidates = statement.decorator_list
            elif isinstance(statement, ast.Assign | ast.Expr):
                candidates = [n for n in ast.walk(statement.value) if isinstance(n, ast.Call)]
            else:
                continue
            for node in candidates:
                called = node.func if isinstance(node, ast.Call) else node
                if ast.unparse(called) in ENTRYPOINT_MAKERS:
                    found.add(name)
    return found


def layer_violations(
    graph: Mapping[str, set[str]],
    layers: Sequence[Sequence[str]],
    entry: set[str],
    aliases: Mapping[str, str],
) -> list[str]:
    """Every arrow that breaks the rules of the module docstring, as readable lines."""
    layer_of = {name: i for i, names in enumerate(layers) for name in names}
    layer_of[""] = 0  # the root package's __init__
    problems = []
    for module in sorted(graph):
        if component(module) not in layer_of:
            problems.append(f"{module}: package {component(module)!r} is in no layer of LAYERS")
            continue
        for target in sorted(graph[module]):
            if target in entry and aliases.get(module) != target:
                problems.append(f"{module} imports the entrypoint {target}")
            if module in entry or aliases.get(module) == target:
                continue  # an entrypoint (or an alias of one) may import from any layer
            if component(target) == component(module):
                continue
            if component(target) not in layer_of:
                continue  # reported for the target itself
            here, there = layer_of[component(module)], layer_of[component(target)]
            if there >= here:
                problems.append(
                    f"{module} (layer {here}: {component(module)}) imports {target} "
                    f"(layer {there}: {component(target)}): arrows point down only"
                )
    return problems


# --- The project ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(ROOT, PACKAGE)


def test_no_import_cycle(graph: dict[str, set[str]]) -> None:
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_upward_import(graph: dict[str, set[str]]) -> None:
    problems = layer_violations(graph, LAYERS, entrypoints(ROOT, PACKAGE), ALIASES)
    assert not problems, "\n".join(problems)


def test_the_bottom_layers_import_nothing_above_them(graph: dict[str, set[str]]) -> None:
    assert graph["post_training.errors"] == set(), "errors.py must stay a leaf"
    assert graph["post_training"] == set()
    for module, targets in graph.items():
        if component(module) in ("utils", "losses"):
            above = {t for t in targets if component(t) not in ("errors", component(module))}
            assert not above, f"{module} imports {sorted(above)}"


def test_entrypoints_are_found_and_aliases_only_call_their_main() -> None:
    entry = entrypoints(ROOT, PACKAGE)
    assert {
        "post_training.train_sft",
        "post_training.train_preference",
        "post_training.train_reward",
        "post_training.evaluate",
        "post_training.merge",
        "post_training.data_sft.build_mixture",
        "post_training.data_sft.inspect",
        "post_training.data_alignment.merge_partitions",
    } <= entry
    modules = module_names(ROOT, PACKAGE)
    for alias, target in ALIASES.items():
        assert target in entry
        tree = ast.parse(modules[alias].read_text(encoding="utf-8"))
        imports = [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
        assert [ast.unparse(n) for n in imports] == ["import runpy"], alias
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
        assert [(ast.unparse(c.func), ast.literal_eval(c.args[0])) for c in calls] == [
            ("runpy.run_module", target)
        ], alias
        assert not [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)]


def _imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    return {name.split(".")[0] for name in out.split()}


def test_losses_import_neither_transformers_nor_tokenizers() -> None:
    loaded = _imported_after("import post_training.losses")
    assert "torch" in loaded  # the check itself works
    assert not loaded & {"transformers", "tokenizers", "datasets"}


def test_the_package_root_is_light() -> None:
    loaded = _imported_after("import post_training, post_training.errors")
    assert not loaded & {"torch", "transformers", "tokenizers", "datasets", "omegaconf", "hydra"}


# --- The checker on a synthetic package -------------------------------------------------------


def _package(tmp_path: Path, files: Mapping[str, str]) -> Path:
    root = tmp_path / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


SYNTHETIC_LAYERS = (("low", "wrap"), ("mid", "alias"), ("top", "high"))


def test_checker_reports_an_upward_import_even_inside_a_function(tmp_path: Path) -> None:
    root = _package(
        tmp_path,
        {
            "low/__init__.py": "",
            "low/a.py": """
                from typing import TYPE_CHECKING
                if TYPE_CHECKING:
                    from pkg.top import anything  # typing only: not an arrow
                def f():
                    from pkg.mid import b  # upward, hidden in a function
            """,
            "mid/__init__.py": "",
            "mid/b.py": "from pkg.low.a import f\nfrom . import c\n",
            "mid/c.py": "",
            "top.py": "import pkg.mid.b\n",
        },
    )
    graph = import_graph(root, "pkg")
    assert graph["pkg.low.a"] == {"pkg.mid", "pkg.mid.b"}
    assert graph["pkg.mid.b"] == {"pkg.low", "pkg.low.a", "pkg.mid.c"}
    assert graph["pkg.top"] == {"pkg.mid", "pkg.mid.b"}
    problems = layer_violations(graph, SYNTHETIC_LAYERS, set(), {})
    assert problems == [
        "pkg.low.a (layer 0: low) imports pkg.mid (layer 1: mid): arrows point down only",
        "pkg.low.a (layer 0: low) imports pkg.mid.b (layer 1: mid): arrows point down only",
    ]
    assert find_cycle(graph) == ["pkg.low.a", "pkg.mid.b", "pkg.low.a"]


def test_checker_rules_for_entrypoints_aliases_and_unplaced_packages(tmp_path: Path) -> None:
    root = _package(
        tmp_path,
        {
            "low.py": "import hydra\n@hydra.main(config_path='c', version_base=None)\n"
            "def main(cfg):\n    import pkg.high\n",
            "mid.py": "from pkg.low import main\n",
            "alias.py": "from pkg.top import main\n",
            "top.py": "from pkg.wrap import entrypoint\nmain = entrypoint('top')(print)\n",
            "wrap.py": "def entrypoint(name):\n"
            "    import hydra\n"
            "    return hydra.main(config_name=name)\n",
            "high.py": "",
            "stray.py": "",
        },
    )
    graph = import_graph(root, "pkg")
    entry = entrypoints(root, "pkg")
    assert entry == {"pkg.low", "pkg.top"}
    problems = layer_violations(graph, SYNTHETIC_LAYERS, entry, {"pkg.alias": "pkg.top"})
    assert problems == [  # the entrypoint itself may import upward; the alias may import it
        "pkg.mid imports the entrypoint pkg.low",
        "pkg.stray: package 'stray' is in no layer of LAYERS",
    ]
    assert find_cycle(graph) is None
