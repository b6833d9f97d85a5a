"""The layout: recipes are leaves, the layers point down, and files stay readable.

* every Python file under ``recipes/`` imports only the standard library,
  SpeechBrain and its YAML loader, torch, Flower and ``speechbrain_omc``,
  and loads no module by path;
* no code of the package names a file under ``recipes/`` (docstrings may
  point users there), so an installed package runs without the repository;
* the Flower app folder's modules are the library's apps;
* the codec and the engine know nothing above them;
* no class over 400 lines, no function over 80, docstrings under 30 % of
  the library's lines.
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


# ------------------------------------------------------------------ the layers
CODEC = sorted((ROOT / "speechbrain_omc" / "codec").glob("*.py"))
ENGINE = sorted((ROOT / "speechbrain_omc" / "engine").glob("*.py"))
OUTER = ("speechbrain", "hyperpyyaml", "flwr")
UPPER = ("federated", "asr", "experiments", "data", "brain", "checkpoints", "export")


def _modules(path: Path) -> set[str]:
    """Every module ``path`` imports, lazy imports included, relative ones
    resolved against its package."""
    package = ["speechbrain_omc", path.parent.name]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def _uses_torch_nn(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Attribute) and node.attr == "nn":
            if isinstance(node.value, ast.Name) and node.value.id == "torch":
                return True
    return False


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize("path", CODEC, ids=lambda p: p.name)
def test_the_codec_knows_no_modules(path):
    """Tensors and bytes only: no engine, no ``torch.nn``, nothing above."""
    names = _modules(path)
    assert not [n for n in names if _within(n, "speechbrain_omc.engine")]
    assert not [n for n in names if _within(n, "torch.nn")]
    assert not _uses_torch_nn(path)
    ours = [n for n in names if _within(n, "speechbrain_omc")]
    assert all(_within(n, "speechbrain_omc.codec") for n in ours), ours


@pytest.mark.parametrize("path", CODEC + ENGINE, ids=lambda p: p.parent.name + p.name)
def test_codec_and_engine_know_nothing_above_them(path):
    """No SpeechBrain, Flower, federated, recipe or experiment code."""
    names = _modules(path)
    outer = [n for n in names if any(_within(n, o) for o in OUTER)]
    upper = [n for n in names if any(_within(n, f"speechbrain_omc.{u}") for u in UPPER)]
    assert not outer and not upper, (outer, upper)


# ------------------------------------------------------------------ sizes
MAX_CLASS_LINES, MAX_FUNCTION_LINES, MAX_DOCSTRING_SHARE = 400, 80, 0.30


def _spans(tree: ast.AST, kinds) -> list[tuple[str, int]]:
    return [
        (node.name, node.end_lineno - node.lineno + 1)
        for node in ast.walk(tree)
        if isinstance(node, kinds)
    ]


def _docstring_lines(tree: ast.AST) -> int:
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docstrings = _docstrings(tree)
    return sum(
        node.body[0].end_lineno - node.body[0].lineno + 1
        for node in ast.walk(tree)
        if isinstance(node, kinds)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and id(node.body[0].value) in docstrings
    )


def test_no_class_or_function_is_too_long_to_read():
    long = []
    for path in PACKAGE:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        name = path.relative_to(ROOT)
        long += [
            f"{name}:{n} class of {size} lines"
            for n, size in _spans(tree, ast.ClassDef)
            if size > MAX_CLASS_LINES
        ]
        long += [
            f"{name}:{n} function of {size} lines"
            for n, size in _spans(tree, (ast.FunctionDef, ast.AsyncFunctionDef))
            if size > MAX_FUNCTION_LINES
        ]
    assert not long, long


def test_docstrings_stay_in_proportion():
    docstrings = lines = 0
    for path in PACKAGE:
        text = path.read_text(encoding="utf-8")
        docstrings += _docstring_lines(ast.parse(text))
        lines += len(text.splitlines())
    share = docstrings / lines
    print(f"docstrings: {docstrings} of {lines} library lines ({share:.1%})")
    assert share < MAX_DOCSTRING_SHARE, f"{share:.1%}"
