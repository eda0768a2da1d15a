"""MLP and tiny unit-test graphs (each builds and runs in milliseconds)."""

from __future__ import annotations

import onnx

from ._cnn import basic_block, conv_bn_act, inverted_residual
from ._common import check_common, finish, resolve_classes, scaled, start
from ._net import single_thread_blas

__all__ = [
    "build_mlp",
    "build_conv_chain",
    "build_conv_flatten_gemm",
    "build_residual_block",
    "build_concat_block",
    "build_depthwise_block",
]

_COMMON_DOC = """
    opset : int
        Default-domain opset (11 .. ``onnx.defs.onnx_opset_version()``).
    with_bn : bool
        True: Conv (no bias) -> BatchNormalization -> activation.  False: the
        same function with every BN folded into its Conv (which gets a bias).
    seed : int
        Seed of all weights and of the calibration batch.
    width : float
        Multiplier applied to every internal channel count.
    num_classes : int
        Output classes.
    input_size : int
        Square input size (static H = W unless ``dynamic_spatial``).
    dynamic_spatial : bool
        Make H and W symbolic (GlobalAveragePool head).
    calib_images : int
        Images in the N(0, 1) batch used to calibrate BN statistics.
    dead_fraction : float
        Fraction of each BN layer's channels with ``|gamma| < 1e-3``
        (``round(fraction * C)`` per layer, so none below 10 channels).

    Returns
    -------
    onnx.ModelProto
        Input ``input`` ``(N, C, S, S)``, output ``logits`` ``(N, num_classes)``.
"""


def _head(net, x):
    return net.flatten(net.gap(x, name="gap"), name="flatten")


@single_thread_blas
def build_mlp(*, sizes: tuple[int, ...] = (3 * 32 * 32, 512, 256, 10), opset: int = 13,
              with_bn: bool = False, seed: int = 0, width: float = 1.0,
              num_classes: int | None = None, input_size: int = 32, in_channels: int = 3,
              dynamic_spatial: bool = False, calib_images: int = 16,
              dead_fraction: float = 0.05) -> onnx.ModelProto:
    """Flatten -> Gemm -> Relu -> ... -> Gemm on an NCHW image input.

    Unlike the CNN builders, ``with_bn`` defaults to **False** here, giving the
    plain MLP (Gemms with bias, no BN: the "no BN statistics" case).  With
    ``with_bn=True`` each hidden Gemm is bias-free and followed by a 1-D
    BatchNormalization on ``(N, F)``; as everywhere, the ``with_bn=False``
    model is that one with the BNs folded, so both compute the same function.

    Parameters
    ----------
    sizes : tuple of int
        ``(in_features, hidden..., out_features)``; ``sizes[0]`` must equal
        ``in_channels * input_size**2``.
    width : float
        Multiplier for the hidden sizes only.
    num_classes : int, optional
        Overrides ``sizes[-1]`` if given.
    in_channels : int
        Input image channels.
    dynamic_spatial : bool
        Not supported (fixed Flatten size); must be False.
    opset, with_bn, seed, input_size, calib_images, dead_fraction
        See :func:`build_conv_chain`.

    Returns
    -------
    onnx.ModelProto
    """
    check_common(width=width, input_size=input_size, calib_images=calib_images)
    if dynamic_spatial:
        raise ValueError("mlp: dynamic_spatial=True is impossible with a Flatten->Gemm input")
    sizes = tuple(int(s) for s in sizes)
    if len(sizes) < 2:
        raise ValueError(f"sizes needs at least (in, out), got {sizes}")
    if sizes[0] != in_channels * input_size**2:
        raise ValueError(f"sizes[0]={sizes[0]} != in_channels*input_size**2="
                         f"{in_channels * input_size**2}")
    num_classes = resolve_classes(num_classes if num_classes is not None else sizes[-1], False)
    net, x = start(opset=opset, seed=seed, with_bn=with_bn, input_size=input_size,
                   calib_images=calib_images, channels=in_channels, dead_fraction=dead_fraction)
    x = net.flatten(x, name="flatten")
    for i, h in enumerate(sizes[1:-1]):
        # Always Gemm(no bias)-BN; with_bn=False folds it, so the plain MLP's
        # weights/biases are the folded ones (well scaled, same function).
        x = net.gemm(x, scaled(h, width), bias=False, name=f"fc{i + 1}")
        x = net.relu(net.bn(x, name=f"bn{i + 1}"), name=f"relu{i + 1}")
    opts = dict(opset=opset, with_bn=with_bn, seed=seed, width=width, num_classes=num_classes,
                input_size=input_size, sizes=sizes, dynamic_spatial=False)
    return finish(net, x, num_classes, name="mlp", options=opts, doc="MLP (udfc-onnx test model)")


@single_thread_blas
def build_conv_chain(*, channels: tuple[int, ...] = (3, 8, 16, 16), with_pool: bool = False,
                     activation: str = "relu", opset: int = 13, with_bn: bool = True, seed: int = 0,
                     width: float = 1.0, num_classes: int = 10, input_size: int = 32,
                     dynamic_spatial: bool = False, calib_images: int = 16,
                     dead_fraction: float = 0.05) -> onnx.ModelProto:
    """Plain chain ``(Conv3x3-BN-act[-MaxPool2x2]) x k`` -> GAP -> Flatten -> Gemm.

    Parameters
    ----------
    channels : tuple of int
        ``(in_channels, c1, c2, ...)``; one conv per consecutive pair.
    with_pool : bool
        MaxPool 2x2/2 after every conv block.
    activation : {'relu', 'relu6', 'leakyrelu', 'none'}
        ReLU6 is ``Clip(0, 6)``; LeakyRelu uses ``alpha=0.1``; ``'none'``
        makes the conv stack linear.
    """
    check_common(width=width, input_size=input_size, calib_images=calib_images)
    if len(channels) < 2:
        raise ValueError(f"channels needs at least (in, out), got {channels}")
    net, x = start(opset=opset, seed=seed, with_bn=with_bn, input_size=input_size,
                   calib_images=calib_images, dynamic_spatial=dynamic_spatial,
                   channels=channels[0], dead_fraction=dead_fraction)
    for i, c in enumerate(channels[1:]):
        x = conv_bn_act(net, x, scaled(c, width), 3, act=activation, name=f"conv{i + 1}",
                        bn_name=f"bn{i + 1}")
        if with_pool:
            x = net.maxpool(x, 2, 2, name=f"pool{i + 1}")
    opts = dict(opset=opset, with_bn=with_bn, seed=seed, width=width, num_classes=num_classes,
                input_size=input_size, channels=tuple(channels), with_pool=with_pool,
                activation=activation, dynamic_spatial=dynamic_spatial)
    return finish(net, _head(net, x), resolve_classes(num_classes, False), name="conv_chain",
                  options=opts, doc="conv chain (udfc-onnx unit-test model)")


@single_thread_blas
def build_conv_flatten_gemm(*, channels: tuple[int, ...] = (3, 8, 16), flatten_size: int = 4,
                            opset: int = 13, with_bn: bool = True, seed: int = 0, width: float = 1.0,
                            num_classes: int = 10, input_size: int = 32,
                            dynamic_spatial: bool = False, calib_images: int = 16,
                            dead_fraction: float = 0.05) -> onnx.ModelProto:
    """Convs -> Flatten of a ``flatten_size`` square map -> Gemm (no GAP).

    The first conv is a "patchify" conv (kernel = stride = ``input_size //
    flatten_size``, no padding) so the map is ``flatten_size`` square; the
    others are 3x3/1.  Every conv is Conv-BN-Relu.  After Flatten (NCHW order)
    channel ``c`` of the last conv owns Gemm input columns
    ``c*F*F .. c*F*F + F*F - 1`` (``F = flatten_size``; 16 columns by default),
    the case a channel pruner must map onto Gemm columns.

    Parameters
    ----------
    channels : tuple of int
        ``(in_channels, c1, ...)``.
    flatten_size : int
        Spatial size of the flattened map; must divide ``input_size``.
    dynamic_spatial : bool
        Not supported (fixed Flatten size); must be False.
    """
    check_common(width=width, input_size=input_size, calib_images=calib_images)
    if dynamic_spatial:
        raise ValueError("conv_flatten_gemm: dynamic_spatial=True is impossible with Flatten->Gemm")
    if len(channels) < 2 or input_size % flatten_size:
        raise ValueError(f"need >= 1 conv and flatten_size | input_size "
                         f"(channels={channels}, input_size={input_size}, flatten_size={flatten_size})")
    k = input_size // flatten_size
    net, x = start(opset=opset, seed=seed, with_bn=with_bn, input_size=input_size,
                   calib_images=calib_images, channels=channels[0], dead_fraction=dead_fraction)
    for i, c in enumerate(channels[1:]):
        kk, s = (k, k) if i == 0 else (3, 1)
        x = net.conv(x, scaled(c, width), kk, stride=s, pad=0 if i == 0 else 1, name=f"conv{i + 1}")
        x = net.relu(net.bn(x, name=f"bn{i + 1}"), name=f"relu{i + 1}")
    x = net.flatten(x, name="flatten")
    opts = dict(opset=opset, with_bn=with_bn, seed=seed, width=width, num_classes=num_classes,
                input_size=input_size, channels=tuple(channels), flatten_size=flatten_size,
                dynamic_spatial=False)
    return finish(net, x, resolve_classes(num_classes, False), name="conv_flatten_gemm",
                  options=opts, doc="conv -> flatten -> gemm (udfc-onnx unit-test model)")


@single_thread_blas
def build_residual_block(*, channels: int = 16, projection: bool = True, opset: int = 13,
                         with_bn: bool = True, seed: int = 0, width: float = 1.0,
                         num_classes: int = 10, input_size: int = 32, dynamic_spatial: bool = False,
                         calib_images: int = 16, dead_fraction: float = 0.05) -> onnx.ModelProto:
    """Stem Conv-BN-Relu, a BasicBlock with identity shortcut, optionally a
    BasicBlock with a 1x1-conv-BN projection (2x channels, stride 2); GAP head.

    Parameters
    ----------
    channels : int
        Stem / first block channels.
    projection : bool
        Append the down-sampling block with projection shortcut.
    """
    check_common(width=width, input_size=input_size, calib_images=calib_images)
    c = scaled(channels, width)
    net, x = start(opset=opset, seed=seed, with_bn=with_bn, input_size=input_size,
                   calib_images=calib_images, dynamic_spatial=dynamic_spatial,
                   dead_fraction=dead_fraction)
    x = conv_bn_act(net, x, c, 3, name="conv1", bn_name="bn1")
    x = basic_block(net, x, c, 1, name="block1")
    if projection:
        x = basic_block(net, x, 2 * c, 2, name="block2")
    opts = dict(opset=opset, with_bn=with_bn, seed=seed, width=width, num_classes=num_classes,
                input_size=input_size, channels=channels, projection=projection,
                dynamic_spatial=dynamic_spatial)
    return finish(net, _head(net, x), resolve_classes(num_classes, False), name="residual_block",
                  options=opts, doc="residual block (udfc-onnx unit-test model)")


@single_thread_blas
def build_concat_block(*, channels: int = 16, branches: tuple[int, int] = (8, 16),
                       include_input: bool = False, opset: int = 13, with_bn: bool = True,
                       seed: int = 0, width: float = 1.0, num_classes: int = 10,
                       input_size: int = 32, dynamic_spatial: bool = False,
                       calib_images: int = 16, dead_fraction: float = 0.05) -> onnx.ModelProto:
    """Stem, two parallel branches (Conv1x1-BN-Relu, Conv3x3-BN-Relu), Concat
    on channels, fuse Conv1x1-BN-Relu, GAP head (Inception-like).

    Parameters
    ----------
    channels : int
        Stem and fuse-conv channels.
    branches : tuple of int
        Output channels of the 1x1 and 3x3 branch.
    include_input : bool
        Also concatenate the stem output (first), so a Concat slice comes from
        a tensor with several consumers (DenseNet-like).
    """
    check_common(width=width, input_size=input_size, calib_images=calib_images)
    c = scaled(channels, width)
    net, x = start(opset=opset, seed=seed, with_bn=with_bn, input_size=input_size,
                   calib_images=calib_images, dynamic_spatial=dynamic_spatial,
                   dead_fraction=dead_fraction)
    x = conv_bn_act(net, x, c, 3, name="stem")
    a = conv_bn_act(net, x, scaled(branches[0], width), 1, name="branch1x1")
    b = conv_bn_act(net, x, scaled(branches[1], width), 3, name="branch3x3")
    x = net.concat([x, a, b] if include_input else [a, b], name="concat")
    x = conv_bn_act(net, x, c, 1, name="fuse")
    opts = dict(opset=opset, with_bn=with_bn, seed=seed, width=width, num_classes=num_classes,
                input_size=input_size, channels=channels, branches=tuple(branches),
                include_input=include_input, dynamic_spatial=dynamic_spatial)
    return finish(net, _head(net, x), resolve_classes(num_classes, False), name="concat_block",
                  options=opts, doc="concat block (udfc-onnx unit-test model)")


@single_thread_blas
def build_depthwise_block(*, channels: int = 16, expansion: int = 4, opset: int = 13,
                          with_bn: bool = True, seed: int = 0, width: float = 1.0,
                          num_classes: int = 10, input_size: int = 32,
                          dynamic_spatial: bool = False, calib_images: int = 16,
                          dead_fraction: float = 0.05) -> onnx.ModelProto:
    """Stem Conv3x3-BN-ReLU6, one MobileNetV2 inverted residual (1x1 expand,
    3x3 depthwise ``group=C``, 1x1 linear project, residual Add), GAP head.

    Parameters
    ----------
    channels : int
        Stem / block output channels.
    expansion : int
        Expansion factor ``t`` (hidden = ``channels * t``).
    """
    check_common(width=width, input_size=input_size, calib_images=calib_images)
    c = scaled(channels, width)
    net, x = start(opset=opset, seed=seed, with_bn=with_bn, input_size=input_size,
                   calib_images=calib_images, dynamic_spatial=dynamic_spatial,
                   dead_fraction=dead_fraction)
    x = conv_bn_act(net, x, c, 3, act="relu6", name="stem")
    x = inverted_residual(net, x, c, 1, expansion, name="block")
    opts = dict(opset=opset, with_bn=with_bn, seed=seed, width=width, num_classes=num_classes,
                input_size=input_size, channels=channels, expansion=expansion,
                dynamic_spatial=dynamic_spatial)
    return finish(net, _head(net, x), resolve_classes(num_classes, False), name="depthwise_block",
                  options=opts, doc="depthwise block (udfc-onnx unit-test model)")


# The unit-test graphs share most parameters: append their descriptions once.
for _f in (build_conv_chain, build_conv_flatten_gemm, build_residual_block, build_concat_block,
           build_depthwise_block):
    _f.__doc__ = _f.__doc__.rstrip() + "\n" + _COMMON_DOC
del _f
