"""The recipes are leaves of the library, and the library needs no repository.

* every Python file under ``recipes/`` imports only the standard library,
  SpeechBrain and its YAML loader, torch, Flower and ``speechbrain_omc``,
  and loads no module by path;
* no code of the package names a file under ``recipes/`` (docstrings may
  point users there), so an installed package runs without the repository;
* the Flower app folder's modules are the library's apps.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.py"))
PACKAGE = sorted((ROOT / "speechbrain_omc").rglob("*.py"))
ALLOWED = {"speechbrain", "hyperpyyaml", "torch", "flwr", "speechbrain_omc"}


def _imports(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr):
                if isinstance(body[0].value, ast.Constant):
                    ids.add(id(body[0].value))
    return ids


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_recipe_imports_only_the_library(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    own_package = {"omc_flower"}  # the app folder's package, by Flower's rules
    others = _imports(tree) - ALLOWED - own_package - set(sys.stdlib_module_names)
    assert not others, f"{path.name} imports {sorted(others)}"
    assert "importlib" not in _imports(tree)
    assert "spec_from_file_location" not in path.read_text(encoding="utf-8")


def test_recipes_hold_no_library_code():
    """The two train.py files only wire hparams to library functions."""
    for path in ROOT.glob("recipes/SynthSpeech/*/train.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        defined = [
            n.name
            for n in tree.body
            if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
        ]
        assert defined == [], f"{path}: {defined} belong in speechbrain_omc.asr"


@pytest.mark.parametrize("path", PACKAGE, ids=lambda p: str(p.relative_to(ROOT)))
def test_package_names_no_recipe_file(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) in docstrings:
                continue
            assert "recipes" not in node.value, (path, node.lineno, node.value)


def test_flower_app_folder_names_the_library_apps():
    sys.path.insert(0, str(ROOT / "recipes/SynthSpeech/federated/flower"))
    try:
        from omc_flower import client_app, server_app

        from speechbrain_omc.federated.flower import client_app as lib_client
        from speechbrain_omc.federated.flower import server_app as lib_server
    finally:
        sys.path.pop(0)
    assert client_app.app is lib_client.app
    assert server_app.app is lib_server.app
