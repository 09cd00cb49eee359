"""The layout's dependency rules hold: import-linter's contracts (pyproject.toml) pass.

import-linter reads a package from one directory tree, while stager maps ``client/`` and
``protocol/`` into it (setuptools package-dir). The test lays the tree out as installed in a
temporary directory and runs ``lint-imports`` there.
"""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

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
    result = subprocess.run([lint, str(tree / "pyproject.toml"), "--no-cache"], cwd=tree, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 kept, 0 broken" in result.stdout, result.stdout


def test_every_package_says_what_it_holds_and_may_import():
    for package in ("stager", "stager/daemon", "stager/consumers", "stager/dev", "client", "client/hook",
                    "client/readers", "client/adapters", "protocol", "stager/integrations",
                    "stager/integrations/vllm"):
        doc = (ROOT / package / "__init__.py").read_text()
        assert doc.lstrip().startswith('"""'), f"{package}/__init__.py has no docstring"
