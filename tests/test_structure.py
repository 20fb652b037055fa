"""The package's structure: imports run one way, and the core never pulls in orchestration."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ORCHESTRATION = ("prefect", "mlflow", "boto3", "botocore")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every `moe` module this file imports, at any depth (function-level imports included):
    an import inside a function is still an edge of the graph."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name in modules:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in (ROOT / "moe").rglob("*.py") if p.name != "__main__.py"}
    # A package's __init__ is imported with any of its submodules; edges to a package mean
    # its __init__ only, which holds docstrings (and the CLI's app object).
    return {name: _imports(path, set(files)) - {name} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_moe_imports_form_no_circle():
    graph = import_graph()
    assert "moe.wan.file_kind" in graph and "moe.inspect" in graph["moe.cli.checkpoints"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The module graph folded to `moe`'s top-level packages and root modules (`moe.wan`,
    `moe.merge`): a circle between two packages counts even when no two modules form one."""

    def package(module: str) -> str:
        return ".".join(module.split(".")[:2])

    folded: dict[str, set[str]] = {}
    for module, targets in graph.items():
        folded.setdefault(package(module), set()).update(package(t) for t in targets if package(t) != package(module))
    return folded


def test_package_graph_folds_modules():
    folded = package_graph({"moe.a.x": {"moe.b.y"}, "moe.b.y": {"moe.b.z"}, "moe.b.z": {"moe.a.w"}, "moe.a.w": set()})
    assert folded == {"moe.a": {"moe.b"}, "moe.b": {"moe.a"}} and find_cycle(folded)


def test_moe_packages_form_no_circle():
    """Function-level imports count: `moe.wan` once reached `moe.data` only inside functions."""
    folded = package_graph(import_graph())
    assert "moe.data" in folded["moe.tiny"] and "moe.wan" in folded["moe.data"]
    assert find_cycle(folded) is None, " -> ".join(find_cycle(folded))


# The floors, lowest first: a package may import only packages on lower floors (and its own).
FLOORS = [
    {"moe.errors"},
    {"moe.config", "moe.model_uri"},
    {"moe.files", "moe.runtime"},
    {"moe.wan"},
    {"moe.lora", "moe.data"},
    {"moe.lora_moe", "moe.merge"},
    {"moe.dit", "moe.inspect"},
    {"moe.inference"},
    {"moe.train", "moe.eval"},
    {"moe.tiny"},
    {"moe.cli"},
]


def test_imports_run_down_the_floors():
    folded = package_graph(import_graph())
    floor = {package: level for level, packages in enumerate(FLOORS) for package in packages}
    assert set(folded) - {"moe"} <= set(floor), f"a package on no floor: {sorted(set(folded) - set(floor) - {'moe'})}"
    upward = [
        f"{a} -> {b}"
        for a, targets in folded.items()
        if a in floor
        for b in targets
        if b in floor and floor[b] >= floor[a] and not {a, b} <= {"moe.train", "moe.eval"}
    ]
    assert not upward, upward
    # training and evaluation share no module: what both need lives in `moe.dit`
    assert "moe.train" not in folded["moe.eval"] and "moe.eval" not in folded["moe.train"]


def test_every_source_folder_is_a_package():
    """A folder of modules without `__init__.py` imports (as a namespace package) but is left out
    of the wheel (`setuptools.find_packages`) and of `pkgutil.walk_packages`."""
    from setuptools import find_packages

    folders = {p.parent for top in ("moe", "tasks", "flows") for p in (ROOT / top).rglob("*.py")}
    packages = {ROOT.joinpath(*name.split(".")) for name in find_packages(str(ROOT), include=["moe*", "tasks*", "flows*"])}
    assert folders <= packages, sorted(str(f.relative_to(ROOT)) for f in folders - packages)


def test_moe_root_holds_only_packages_and_operations():
    """Loose modules at the root are the error type and the one-file operations."""
    root = sorted(p.stem for p in (ROOT / "moe").glob("*.py"))
    assert root == ["__init__", "__main__", "errors", "inference", "inspect", "merge", "model_uri"], root


def test_config_package_is_torch_free():
    """`moe.config` imports nothing but the standard library, pydantic, yaml and the error type,
    at any depth; importing all of it in a fresh interpreter loads no torch."""
    allowed = {"pydantic", "yaml", "moe"}
    offenders = []
    for path in (ROOT / "moe" / "config").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
            )
            for name in names:
                top = name.split(".")[0]
                if (top not in allowed and top not in sys.stdlib_module_names) or (
                    top == "moe" and not (name == "moe.errors" or name.startswith("moe.config"))
                ):
                    offenders.append(f"{path.relative_to(ROOT)}: {name}")
    assert not offenders, offenders
    names = sorted(n for n in import_graph() if n.startswith("moe.config"))
    modules, _ = _imports_in_fresh_interpreter("import importlib\n" + "\n".join(f"importlib.import_module({n!r})" for n in names))
    assert set(names) <= modules and "torch" not in modules


@pytest.mark.parametrize("argv", [["--help"], ["stage1", "--help"], ["registry", "--help"]])
def test_cli_help_loads_no_torch(argv):
    """`lora-moe --help` and a command's help start without torch (about 2 s less per call)."""
    code = f"import sys; sys.argv = ['lora-moe', *{argv!r}]\nfrom moe.cli import main\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
    modules, _ = _imports_in_fresh_interpreter(code)
    assert "moe.cli" in modules and "torch" not in modules


def test_file_formats_sit_below_inspect():
    """Readers of each format use the low-level file-kind check, never the `inspect` report."""
    graph = import_graph()
    for reader in ("moe.lora.file", "moe.lora_moe.file", "moe.wan.checkpoint", "moe.merge"):
        assert "moe.inspect" not in graph[reader], reader
    assert "moe.wan.file_kind" in graph["moe.lora.file"]


# Code run before the probe's imports: records, for each orchestration package, the file that
# first imported it (the innermost frame outside importlib).
_RECORD_IMPORTERS = """
import sys, traceback
ORCHESTRATION = %r
IMPORTERS = {}
class Recorder:
    def find_spec(self, name, path=None, target=None):
        stack = traceback.extract_stack()
        # An import statement reaches finders through _find_and_load_unlocked; availability
        # probes (importlib.util.find_spec) do not load anything and are not recorded.
        if name in ORCHESTRATION and name not in IMPORTERS and stack[-3].name == "_find_and_load_unlocked":
            frames = [f.filename for f in stack if "importlib" not in f.filename]
            IMPORTERS[name] = frames[-2] if len(frames) > 1 else "?"
        return None
sys.meta_path.insert(0, Recorder())
""" % (ORCHESTRATION,)


def _imports_in_fresh_interpreter(code: str) -> tuple[set[str], dict[str, str]]:
    """(sys.modules after running `code`, orchestration package -> file that imported it)."""
    report = "\nimport json; print(json.dumps([sorted(sys.modules), IMPORTERS]))"
    done = subprocess.run(
        [sys.executable, "-c", _RECORD_IMPORTERS + code + report],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    modules, importers = json.loads(done.stdout.strip().splitlines()[-1])
    return set(modules), importers


@pytest.mark.parametrize("probe", ORCHESTRATION)
def test_probe_detects_an_import(probe):
    """The check below can fail: importing the package itself shows up, with its importer."""
    pytest.importorskip(probe)
    modules, importers = _imports_in_fresh_interpreter(f"import {probe}")
    assert probe in modules and importers[probe] == "<string>"


def test_moe_source_never_imports_orchestration():
    """No `moe` module imports prefect, mlflow, boto3 or botocore, at any depth."""
    offenders = []
    for path in (ROOT / "moe").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            )
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in ORCHESTRATION]
    assert not offenders, offenders


def test_moe_imports_no_orchestration_package():
    """`moe` and every submodule, imported in a fresh interpreter, pull in no prefect or mlflow.
    boto3/botocore may arrive only through accelerate, whose SageMaker config module imports
    boto3 whenever it is installed (`accelerate/commands/config/sagemaker.py`); nothing of ours
    asks for it."""
    names = sorted(import_graph())
    code = "import importlib\n" + "\n".join(f"importlib.import_module({n!r})" for n in names)
    modules, importers = _imports_in_fresh_interpreter(code)
    assert set(names) <= modules
    assert not [m for m in modules if m.split(".")[0] in ("prefect", "mlflow")]
    if "boto3" in modules:
        assert Path(importers["boto3"]).parts[-4:] == ("accelerate", "commands", "config", "sagemaker.py"), importers
    if "botocore" in modules:
        assert "boto3" in Path(importers["botocore"]).parts or "accelerate" in Path(importers["botocore"]).parts, importers
