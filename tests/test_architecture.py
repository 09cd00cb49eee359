"""The layout's dependency rules hold: import-linter's contracts (pyproject.toml) pass.

import-linter reads a package from one directory tree, while stager maps ``client/`` and
``protocol/`` into it (setuptools package-dir). The test lays the tree out as installed in a
temporary directory and runs ``lint-imports`` there.
"""

import ast
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.fast  # the fast tier: no daemon process, no torch.distributed job

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _installed_layout(dest: pathlib.Path) -> pathlib.Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.c")
    shutil.copytree(ROOT / "stager", dest / "stager", ignore=ignore)
    shutil.copytree(ROOT / "client", dest / "stager" / "client", ignore=ignore)
    shutil.copytree(ROOT / "protocol", dest / "stager" / "protocol", ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def test_import_contracts_hold(tmp_path):
    pytest.importorskip("importlinter")
    tree = _installed_layout(tmp_path)
    lint = shutil.which("lint-imports") or os.path.join(os.path.dirname(sys.executable), "lint-imports")
    env = {**os.environ, "PYTHONPATH": str(tree)}
    result = subprocess.run(
        [lint, str(tree / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "8 kept, 0 broken" in result.stdout, result.stdout


def test_every_package_says_what_it_holds_and_may_import():
    for package in (
        "stager",
        "stager/daemon",
        "stager/formats",
        "stager/loaders",
        "stager/writers",
        "stager/dev",
        "client",
        "client/hook",
        "client/readers",
        "client/adapters",
        "protocol",
        "stager/integrations",
        "stager/integrations/vllm",
    ):
        doc = (ROOT / package / "__init__.py").read_text()
        assert doc.lstrip().startswith('"""'), f"{package}/__init__.py has no docstring"


HEAVY = ("transformers", "torchtitan", "peft", "torchao")  # seconds each to import


def _top_level(node):
    """The statements of a module run at import: not inside a function or class body."""
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            yield child
            yield from _top_level(child)


def test_test_modules_import_no_heavy_package_at_the_top():
    """pytest imports every test module to collect it, `-m fast` too: transformers, torchtitan, peft and
    torchao are imported inside the tests that use them (helpers.lazy_importorskip), never at the top."""
    found = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in _top_level(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Call) and ast.unparse(node.func) == "pytest.importorskip" and node.args:
                names = [ast.literal_eval(node.args[0])]
            found += [f"{path.name}:{node.lineno} {n}" for n in names if n.partition(".")[0] in HEAVY]
    assert not found, f"imported at the top of a test module (use helpers.lazy_importorskip): {found}"
