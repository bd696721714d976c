import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.append(ROOT)  # for models.digits; appended so an installed onnxshrink wins over the source folder

MODELS = os.path.join(ROOT, "models")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def tiny_cnn():
    from graphs import conv_bn_net
    return conv_bn_net()
