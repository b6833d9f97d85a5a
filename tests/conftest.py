"""Test-session setup shared by every test module."""

import sys
import warnings

import pytest


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
