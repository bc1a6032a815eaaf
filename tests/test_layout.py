"""The house's hard rules, measured from the code's own imports: subpackages by role, no import circles, argparse and
the `cli` package only under cli/; and the tests' own layout: each test file in the folder of the wing it tests, or
one of the house-wide ones. (Module length and import depth are guides, not tests: the before-stop hook prints
them.)"""
import ast
import subprocess
import sys
import tomllib
from collections import Counter
from pathlib import Path

import pytest

import scalegen
from tests_support import TEST_WINGS, TESTS

PACKAGE = Path(scalegen.__file__).parent
SUBPACKAGES = {"models", "diffusion", "tokenizers", "train", "eval", "cli", "runs"}
# The runs wing: a run folder's layout, lock, readers, loaders and exports, once top-level modules of these names.
RUN_MODULES = {"folder", "lock", "weights", "loading", "export", "diffusers_export", "names"}
MOVED_TO_RUNS = {"checkpoint", "checkpoint_names", "run_lock", "pretrained", "diffusers_export"}
# tests/WING/ holds the tests of one wing (`pytest tests/WING` runs them): tests_support.TEST_WINGS names them, and
# pyproject's pythonpath names each folder

# what stays in tests/ itself: the tests of the house as a whole (its layout, README, public API, tools, shipped
# models, GPU-only checks), the shared helpers and pytest's settings
HOUSE_WIDE = {"test_layout.py", "test_readme.py", "test_api.py", "test_tools.py", "test_shipped.py", "test_gpu.py",
              "test_registry.py", "tests_support.py", "conftest.py"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """The scalegen modules a module imports (`from scalegen.eval import metrics` names scalegen.eval.metrics)."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module
                      for alias in node.names}
    return {module for module in found if module in MODULES and module != name}


def floors() -> dict[str, int]:
    """Each module's floor: 1 when it imports no other scalegen module, else one above the highest it imports."""
    found: dict[str, int] = {}

    def visit(name: str, path: tuple[str, ...]) -> int:
        assert name not in path, f"import circle: {' -> '.join(path + (name,))}"
        if name not in found:
            found[name] = 1 + max((visit(imported, path + (name,)) for imported in imports_of(name)), default=0)
        return found[name]

    for name in MODULES:
        visit(name, ())
    return found


def test_modules_sit_in_subpackages_by_role():
    top_level = {name.split(".")[1] for name in MODULES if name.count(".") >= 1}
    assert SUBPACKAGES <= top_level
    assert {"__main__", "errors", "data", "distributed", "images"} <= top_level


def test_the_run_modules_live_in_the_runs_wing_alone():
    """No module, nor a re-export shim, is left at the old top-level names of the runs wing's modules."""
    assert {f"scalegen.runs.{name}" for name in RUN_MODULES} <= set(MODULES)
    assert not {f"scalegen.{name}" for name in MOVED_TO_RUNS} & set(MODULES)


def test_no_import_circles():
    measured = floors()  # visiting every module's imports asserts there is no circle
    assert measured["scalegen.errors"] == 1 and len(measured) == len(MODULES)


def test_argparse_and_the_cli_live_only_in_cli():
    for name, path in MODULES.items():
        if name.startswith("scalegen.cli") or name == "scalegen.__main__":
            continue
        tree = ast.parse(path.read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert "argparse" not in imported, f"{name} imports argparse"
        assert not any(module.startswith("scalegen.cli") for module in imported), f"{name} imports the cli"
        assert "add_argument" not in path.read_text(), f"{name} defines command-line options"


MODEL_IMPORTS_FORBIDDEN = ("scalegen.data", "scalegen.distributed", "scalegen.runs",
                           "torch.distributed")  # models do no data or distributed work (the data wing: scalegen.data.*)


def imported_names(name: str) -> set[str]:
    """Every module name a module's imports reach, scalegen's or not: `from torch import distributed` names torch and
    torch.distributed, `from .settings import X` scalegen.models.settings and scalegen.models.settings.X."""
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""  # `from ..x` climbs one package
            module = ".".join(part for part in (base, node.module) if part)
            found |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return found


def test_models_do_no_io():
    forbidden = {"os", "pathlib", "shutil", "safetensors", "safetensors.torch", "scalegen.files",
                 "scalegen.runs.loading"}
    for name, path in MODULES.items():
        if not name.startswith("scalegen.models"):
            continue
        tree = ast.parse(path.read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & forbidden, f"{name} imports {imported & forbidden}"
        calls = {node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                 for node in ast.walk(tree) if isinstance(node, ast.Call)}
        assert not calls & {"open", "load", "save", "save_file", "load_file"}, f"{name} reads or writes files"


def test_models_do_no_data_or_distributed_work():
    for name in MODULES:
        if not name.startswith("scalegen.models"):
            continue
        reached = {module for module in imported_names(name) for forbidden in MODEL_IMPORTS_FORBIDDEN
                   if module == forbidden or module.startswith(f"{forbidden}.")}
        assert not reached, f"{name} imports {sorted(reached)}: a model takes tensors, labels and a precision name"


def test_loading_the_models_loads_no_data_or_distributed_code_behind_them():
    """Not only the models' own imports: nothing they import in turn (the objectives, their sampling) pulls in the
    data readers, the run folders or torch.distributed's scalegen side."""
    code = ("import sys, scalegen.models.dit, scalegen.models.var; "
            "print(' '.join(sorted(name for name in sys.modules if name.startswith('scalegen.'))))")
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())
    reached = {name for name in loaded for forbidden in MODEL_IMPORTS_FORBIDDEN
               if forbidden.startswith("scalegen.") and (name == forbidden or name.startswith(f"{forbidden}."))}
    assert not reached, f"importing the models loads {sorted(reached)}"


@pytest.mark.parametrize("line, reached", [
    ("import torch.distributed as dist", "torch.distributed"),
    ("from torch import distributed", "torch.distributed"),
    ("from torch.distributed.fsdp import FSDPModule", "torch.distributed.fsdp"),
    ("from scalegen.data import label_ids", "scalegen.data"),
    ("from scalegen import data", "scalegen.data"),
    ("from ..distributed import autocast", "scalegen.distributed"),
    ("from . import var_blocks", "scalegen.models.var_blocks"),
])
def test_the_import_walk_sees_every_spelling_of_an_import(tmp_path, monkeypatch, line, reached):
    probe = tmp_path / "probe.py"
    probe.write_text(line + "\n")
    monkeypatch.setitem(MODULES, "scalegen.models.probe", probe)
    assert reached in imported_names("scalegen.models.probe")


def test_every_test_file_lives_in_its_wing_s_folder_or_is_house_wide():
    python_files = [path.relative_to(TESTS) for path in TESTS.rglob("*.py") if path.parts[len(TESTS.parts)] != "golden"]
    misplaced = [str(path) for path in python_files if len(path.parts) == 1 and
                 path.name not in HOUSE_WIDE or len(path.parts) > 2 or
                 len(path.parts) == 2 and path.parts[0] not in TEST_WINGS]
    assert not misplaced, f"put these in a wing's folder (tests/{{{','.join(TEST_WINGS)}}}/) or name them house-wide"
    repeated = [name for name, count in Counter(path.name for path in python_files).items() if count > 1]
    assert not repeated, f"pytest imports test files by their names, which must differ: {repeated}"


def test_pytest_finds_the_helpers_of_every_wing():
    settings = tomllib.loads((TESTS.parent / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert settings["pythonpath"] == ["tests", *(f"tests/{wing}" for wing in TEST_WINGS)]
    assert settings["testpaths"] == ["tests"]
