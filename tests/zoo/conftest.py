"""pytest fixtures for the architecture zoo.

``zoo_model`` is parametrized over every zoo case (``tests/zoo/__init__.py``); the single-model
fixtures below name one case each for tests that want a specific pattern. Test modules outside
this folder import them with ``from zoo.conftest import *``.
"""

import pytest

import zoo

__all__ = ["zoo_model", "resnet_model", "mobilenet_v2_model", "mobilenet_v3_model", "transformer_model",
           "yolo_model", "nhwc_model", "external_model"]


@pytest.fixture(params=zoo.ZOO_NAMES)
def zoo_model(request):
    return zoo.build(request.param)


def _one(name):
    @pytest.fixture
    def fixture():
        return zoo.build(name)
    fixture.__doc__ = zoo.ZOO[name].func.__doc__
    return fixture


resnet_model = _one("resnet_basic_op17")
mobilenet_v2_model = _one("mobilenet_v2_inputs_op11")
mobilenet_v3_model = _one("mobilenet_v3_op17")
transformer_model = _one("transformer_op_erf_op17")
yolo_model = _one("yolo_neck_op17")
nhwc_model = _one("nhwc_tf2onnx_op13")
external_model = _one("external_data_op17")
