"""Synthetic ONNX CNN builders for ``udfc-onnx`` tests and benchmarks.

Every ``build_*`` function is pure and deterministic from ``seed`` and returns
an :class:`onnx.ModelProto` with

* input ``input``: float32 NCHW, batch dim symbolic ``N`` (H, W symbolic too
  with ``dynamic_spatial=True`` where the head is a GlobalAveragePool);
* output ``logits``: ``(N, num_classes)``;
* ``with_bn=True``: Conv (no bias) -> BatchNormalization (inference form, 5
  inputs, ``epsilon=1e-5``) -> activation; ``with_bn=False``: the *same
  function* with each BN folded into its Conv/Gemm (bias added), as a
  PyTorch export with BN folding would produce;
* He-normal conv weights; BN ``gamma ~ U(0.5, 1.5)`` with ~5 % "dead" channels
  (``|gamma| < 1e-3``), ``beta ~ N(0, 0.2)``, and running mean / var equal to
  the per-channel statistics of the layer input on a fixed N(0, 1) calibration
  batch (:func:`calibration_batch`) propagated through the net, so activations
  stay O(1) at any depth;
* ``ir_version`` = the lowest IR version carrying the chosen opset (read by
  onnxruntime), opsets 11 .. ``onnx.defs.onnx_opset_version()`` (tested: 11-21 in the
  test-suite; ORT 1.32 also ran 22-28).

``BUILDERS`` maps registry names to zero-argument-callable builders with small
defaults (each builds in well under 2 s); keyword arguments override them,
e.g. ``BUILDERS['resnet50'](opset=17, with_bn=False)``.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import onnx

from ._cnn import (build_densenet, build_mobilenetv2, build_resnet18, build_resnet50,
                   build_vgg16_bn)
from ._net import BN_EPSILON, MAX_OPSET, MIN_OPSET, calibration_batch, count_params
from ._small import (build_concat_block, build_conv_chain, build_conv_flatten_gemm,
                     build_depthwise_block, build_mlp, build_residual_block)

__all__ = [
    "BUILDERS",
    "BN_EPSILON",
    "MIN_OPSET",
    "MAX_OPSET",
    "build_vgg16_bn",
    "build_resnet18",
    "build_resnet50",
    "build_mobilenetv2",
    "build_densenet",
    "build_mlp",
    "build_conv_chain",
    "build_conv_flatten_gemm",
    "build_residual_block",
    "build_concat_block",
    "build_depthwise_block",
    "calibration_batch",
    "count_params",
    "input_size_of",
]

#: Registry of builders with test-sized defaults (the big nets at reduced width).
BUILDERS: dict[str, Callable[..., onnx.ModelProto]] = {
    "vgg16_bn_cifar": partial(build_vgg16_bn, head="cifar", width=0.25),
    "vgg16_bn_imagenet": partial(build_vgg16_bn, head="imagenet", width=0.125, input_size=64),
    "resnet18": partial(build_resnet18, width=0.25),
    "resnet50": partial(build_resnet50, width=0.25),
    "mobilenetv2": partial(build_mobilenetv2, width=0.5),
    "densenet": partial(build_densenet, blocks=(4, 4), growth=12),
    "mlp": build_mlp,
    "conv_chain": build_conv_chain,
    "conv_flatten_gemm": build_conv_flatten_gemm,
    "residual_block": build_residual_block,
    "concat_block": build_concat_block,
    "depthwise_block": build_depthwise_block,
}


def input_size_of(model: onnx.ModelProto) -> int:
    """Square input size a model was built (and calibrated) for.

    Read from the static input shape, or from the ``input_size`` metadata
    entry when H/W are symbolic.
    """
    dim = model.graph.input[0].type.tensor_type.shape.dim[-1]
    if dim.HasField("dim_value"):
        return int(dim.dim_value)
    return int({p.key: p.value for p in model.metadata_props}["input_size"])
