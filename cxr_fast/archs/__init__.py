"""Architectures: building blocks, cxr_fast's own networks, one registry (local, then timm) and weights."""

from cxr_fast.archs.convnet import ConvNet
from cxr_fast.archs.cxresnet import CXResnet
from cxr_fast.archs.layers import LayerStack, classifier_head, conv_stack, linear_stack, make_layer
from cxr_fast.archs.registry import (
    LOCAL_ARCHS,
    CXRModel,
    create_model,
    list_models,
    model_config,
    model_from_config,
    param_groups,
    register_arch,
    splitter,
)
from cxr_fast.archs.weights import (
    WEIGHTS_HELP,
    LoadReport,
    Stats,
    efficientnet_lite_imagenet,
    load_weights_file,
    read_state_dict,
)

__all__ = [
    "LOCAL_ARCHS",
    "WEIGHTS_HELP",
    "CXRModel",
    "CXResnet",
    "ConvNet",
    "LayerStack",
    "LoadReport",
    "Stats",
    "classifier_head",
    "conv_stack",
    "create_model",
    "efficientnet_lite_imagenet",
    "linear_stack",
    "list_models",
    "load_weights_file",
    "make_layer",
    "model_config",
    "model_from_config",
    "param_groups",
    "read_state_dict",
    "register_arch",
    "splitter",
]
