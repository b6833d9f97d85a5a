"""Test-session setup shared by every test module."""

import importlib.util
import sys
import warnings
from pathlib import Path
from types import ModuleType

import pytest

# Job scripts run in subprocesses; importing them here (doctest collection)
# would run their setup in the test session (one of them hides the plugin).
# The hostile task module too: importing it makes clients 001 and 002 of
# every later test in this process hostile.
collect_ignore_glob = ["jobs/*"]
collect_ignore = ["hostile_task.py"]

# The Flower app folder: its package (omc_flower) is importable in tests as
# Flower makes it importable in its processes.
APP_DIR = Path(__file__).resolve().parents[1] / "recipes/SynthSpeech/federated/flower"
if str(APP_DIR) not in sys.path:
    sys.path.insert(0, str(APP_DIR))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """Drop lazily-importing modules that raise on attribute access.

    SpeechBrain registers lazy modules (for example its k2 integration) whose
    ``__file__`` raises ImportError when the optional dependency is absent;
    hypothesis reads ``__file__`` of every loaded module during collection.
    """
    for name, module in list(sys.modules.items()):
        try:
            with warnings.catch_warnings():  # deprecated redirects warn here
                warnings.simplefilter("ignore")
                getattr(module, "__file__", None)
        except ImportError:
            del sys.modules[name]


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """A script of ``benchmarks/`` as a module (they are not a package)."""
    if not (BENCHMARKS / f"{name}.py").is_file():
        raise FileNotFoundError(f"no benchmark script {name}.py in {BENCHMARKS}")
    spec = importlib.util.spec_from_file_location(
        f"bench_{name}", BENCHMARKS / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def task_identity():
    """Flower stamps run/task/node ids on messages; a runtime sets them."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved
