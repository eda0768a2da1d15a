"""Full-size architectures: VGG16-BN, ResNet-18/50, MobileNetV2, DenseNet-BC."""

from __future__ import annotations

import onnx

from ._common import (check_common, finish, make_divisible, resolve_classes, resolve_stem,
                      scaled, start)
from ._net import Net, T, single_thread_blas

__all__ = [
    "build_vgg16_bn",
    "build_resnet18",
    "build_resnet50",
    "build_mobilenetv2",
    "build_densenet",
    "basic_block",
    "bottleneck",
    "inverted_residual",
]

_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _no_dynamic(dynamic_spatial: bool, what: str) -> None:
    if dynamic_spatial:
        raise ValueError(f"{what}: dynamic_spatial=True needs a GlobalAveragePool head; "
                         "this graph flattens a fixed-size feature map into a Gemm")


# --------------------------------------------------------------------------
# Reusable blocks (also used by the small unit-test graphs)
# --------------------------------------------------------------------------
def conv_bn_act(net: Net, x: T, cout: int, k: int, *, stride: int = 1, groups: int = 1,
                act: str = "relu", name: str, bn_name: str | None = None) -> T:
    """Conv (no bias) -> BatchNormalization -> activation (``act='none'`` to skip)."""
    y = net.conv(x, cout, k, stride=stride, groups=groups, name=name)
    y = net.bn(y, name=bn_name or f"{name}.bn")
    return net.act(y, act, name=f"{name}.{act}")


def basic_block(net: Net, x: T, planes: int, stride: int, *, name: str) -> T:
    """torchvision BasicBlock: 3x3-BN-ReLU-3x3-BN (+ 1x1-BN projection), Add, ReLU."""
    out = net.conv(x, planes, 3, stride=stride, name=f"{name}.conv1")
    out = net.relu(net.bn(out, name=f"{name}.bn1"), name=f"{name}.relu1")
    out = net.bn(net.conv(out, planes, 3, name=f"{name}.conv2"), name=f"{name}.bn2")
    short = x
    if stride != 1 or x.value.shape[1] != planes:
        short = net.conv(x, planes, 1, stride=stride, name=f"{name}.downsample.0")
        short = net.bn(short, name=f"{name}.downsample.1")
    return net.relu(net.add(out, short, name=f"{name}.add"), name=f"{name}.relu")


def bottleneck(net: Net, x: T, planes: int, stride: int, *, name: str, expansion: int = 4) -> T:
    """torchvision Bottleneck (v1.5: stride on the 3x3), 1x1-3x3-1x1 x ``expansion``."""
    out = net.relu(net.bn(net.conv(x, planes, 1, name=f"{name}.conv1"), name=f"{name}.bn1"),
                   name=f"{name}.relu1")
    out = net.conv(out, planes, 3, stride=stride, name=f"{name}.conv2")
    out = net.relu(net.bn(out, name=f"{name}.bn2"), name=f"{name}.relu2")
    out = net.bn(net.conv(out, planes * expansion, 1, name=f"{name}.conv3"), name=f"{name}.bn3")
    short = x
    if stride != 1 or x.value.shape[1] != planes * expansion:
        short = net.conv(x, planes * expansion, 1, stride=stride, name=f"{name}.downsample.0")
        short = net.bn(short, name=f"{name}.downsample.1")
    return net.relu(net.add(out, short, name=f"{name}.add"), name=f"{name}.relu")


def inverted_residual(net: Net, x: T, oup: int, stride: int, expand: int, *, name: str) -> T:
    """MobileNetV2 block: [1x1 expand-BN-ReLU6] -> 3x3 dw-BN-ReLU6 -> 1x1 project-BN (+ Add)."""
    inp = x.value.shape[1]
    hidden = int(round(inp * expand))
    h = x
    if expand != 1:
        h = conv_bn_act(net, h, hidden, 1, act="relu6", name=f"{name}.expand")
    h = conv_bn_act(net, h, hidden, 3, stride=stride, groups=hidden, act="relu6", name=f"{name}.dw")
    h = conv_bn_act(net, h, oup, 1, act="none", name=f"{name}.project")
    if stride == 1 and inp == oup:
        h = net.add(x, h, name=f"{name}.add")
    return h


def _head(net: Net, x: T) -> T:
    return net.flatten(net.gap(x, name="avgpool"), name="flatten")


# --------------------------------------------------------------------------
# VGG16-BN
# --------------------------------------------------------------------------
@single_thread_blas
def build_vgg16_bn(*, head: str = "cifar", opset: int = 13, with_bn: bool = True, seed: int = 0,
                   width: float = 1.0, num_classes: int | None = None, input_size: int | None = None,
                   dynamic_spatial: bool = False, calib_images: int = 16,
                   dead_fraction: float = 0.05) -> onnx.ModelProto:
    """VGG16 with BatchNorm: 13 3x3 convs, 5 MaxPools, CIFAR or ImageNet classifier.

    Parameters
    ----------
    head : {'cifar', 'imagenet'}
        ``'cifar'`` (Neuron Merging's CIFAR VGG): Flatten -> Gemm(C, 512w) ->
        BatchNormalization (1-D, on ``(N, 512w)``) -> Relu -> Gemm(classes).
        ``'imagenet'``: Flatten -> Gemm(4096w) -> Relu -> Gemm(4096w) -> Relu
        -> Gemm(classes) (dropout omitted: inference graph).
    opset : int
        Default-domain opset (11 .. ``onnx.defs.onnx_opset_version()``).
    with_bn : bool
        False folds every BN into its Conv/Gemm (which then gets a bias).
    seed : int
        Seed of all weights and of the calibration batch.
    width : float
        Channel multiplier for convs and hidden Gemms.
    num_classes : int, optional
        Default 10 (cifar head) or 1000 (imagenet head).
    input_size : int, optional
        Square input size, a multiple of 32.  Default 32 (cifar) or 224
        (imagenet).  The feature map before Flatten is ``input_size/32``
        square: 1x1 at 32, 7x7 at 224 (where torchvision's AdaptiveAvgPool to
        7x7 is the identity, so it is omitted); other sizes flatten their own
        map, so the first Gemm has ``C * (input_size/32)**2`` inputs.
    dynamic_spatial : bool
        Not supported (fixed-size Flatten); must be False.
    calib_images : int
        Images in the N(0, 1) batch used to calibrate BN statistics.
    dead_fraction : float
        Fraction of each BN layer's channels with ``|gamma| < 1e-3``.

    Returns
    -------
    onnx.ModelProto
        Input ``input`` ``(N, 3, S, S)``, output ``logits`` ``(N, classes)``.
    """
    if head not in ("cifar", "imagenet"):
        raise ValueError(f"head must be 'cifar' or 'imagenet', got {head!r}")
    _no_dynamic(dynamic_spatial, "vgg16_bn")
    imagenet = head == "imagenet"
    input_size = int(input_size or (224 if imagenet else 32))
    num_classes = resolve_classes(num_classes, imagenet)
    check_common(width=width, input_size=input_size, calib_images=calib_images)
    if input_size % 32:
        raise ValueError(f"vgg16_bn: input_size must be a multiple of 32, got {input_size}")
    net, x = start(opset=opset, seed=seed, with_bn=with_bn, input_size=input_size,
                   calib_images=calib_images, dead_fraction=dead_fraction)
    i = 0  # torchvision-like module index in ``features``
    for v in _VGG16_CFG:
        if v == "M":
            x = net.maxpool(x, 2, 2, name=f"features.{i}")
            i += 1
        else:
            x = net.conv(x, scaled(v, width), 3, name=f"features.{i}")
            x = net.bn(x, name=f"features.{i + 1}")
            x = net.relu(x, name=f"features.{i + 2}")
            i += 3
    x = net.flatten(x, name="flatten")
    if imagenet:
        hidden = scaled(4096, width)
        x = net.relu(net.gemm(x, hidden, name="classifier.0"), name="classifier.1")
        x = net.relu(net.gemm(x, hidden, name="classifier.3"), name="classifier.4")
    else:
        # Bias-free: a bias right before BN is absorbed by the BN mean anyway.
        x = net.gemm(x, scaled(512, width), bias=False, name="classifier.0")
        x = net.relu(net.bn(x, name="classifier.1"), name="classifier.2")
    opts = dict(head=head, opset=opset, with_bn=with_bn, seed=seed, width=width,
                num_classes=num_classes, input_size=input_size, dynamic_spatial=False)
    return finish(net, x, num_classes, name=f"vgg16_bn_{head}", options=opts,
                  doc="VGG16-BN (udfc-onnx synthetic test model)")


# --------------------------------------------------------------------------
# ResNet
# --------------------------------------------------------------------------
def _resnet(block, layers, *, name: str, opset: int, with_bn: bool, seed: int, width: float,
            num_classes: int | None, input_size: int, stem: str | None, dynamic_spatial: bool,
            calib_images: int, dead_fraction: float) -> onnx.ModelProto:
    check_common(width=width, input_size=input_size, calib_images=calib_images)
    stem = resolve_stem(stem, input_size)
    num_classes = resolve_classes(num_classes, stem == "imagenet")
    net, x = start(opset=opset, seed=seed, with_bn=with_bn, input_size=input_size,
                   calib_images=calib_images, dynamic_spatial=dynamic_spatial,
                   dead_fraction=dead_fraction)
    c0 = scaled(64, width)
    if stem == "imagenet":
        x = net.relu(net.bn(net.conv(x, c0, 7, stride=2, name="conv1"), name="bn1"), name="relu")
        x = net.maxpool(x, 3, 2, 1, name="maxpool")
    else:  # CIFAR: 3x3 stride-1 stem, no maxpool (keeps 32x32 in layer1)
        x = net.relu(net.bn(net.conv(x, c0, 3, name="conv1"), name="bn1"), name="relu")
    for si, (planes, n, stride) in enumerate(zip((64, 128, 256, 512), layers, (1, 2, 2, 2))):
        for j in range(n):
            x = block(net, x, scaled(planes, width), stride if j == 0 else 1, name=f"layer{si + 1}.{j}")
    opts = dict(opset=opset, with_bn=with_bn, seed=seed, width=width, num_classes=num_classes,
                input_size=input_size, stem=stem, dynamic_spatial=dynamic_spatial)
    return finish(net, _head(net, x), num_classes, name=name, options=opts,
                  doc=f"{name} (torchvision layout, udfc-onnx synthetic test model)")


_RESNET_DOC = """

    Parameters
    ----------
    opset : int
        Default-domain opset (11 .. ``onnx.defs.onnx_opset_version()``).
    with_bn : bool
        False folds every BN into its Conv (which then gets a bias).
    seed : int
        Seed of all weights and of the calibration batch.
    width : float
        Channel multiplier (stage widths 64/128/256/512 x width).
    num_classes : int, optional
        Default 1000 with the ImageNet stem, else 10.
    input_size : int
        Square input size used for calibration (and the static shape).
    stem : {'cifar', 'imagenet'}, optional
        ``'imagenet'``: conv7x7/2-BN-ReLU-MaxPool3x3/2; ``'cifar'``: conv3x3/1-
        BN-ReLU, no maxpool.  Default: imagenet iff ``input_size >= 128``.
    dynamic_spatial : bool
        Make H and W symbolic (GlobalAveragePool head).
    calib_images : int
        Images in the N(0, 1) batch used to calibrate BN statistics.
    dead_fraction : float
        Fraction of each BN layer's channels with ``|gamma| < 1e-3``.

    Returns
    -------
    onnx.ModelProto
        Input ``input`` ``(N, 3, S, S)``, output ``logits`` ``(N, classes)``.
    """


@single_thread_blas
def build_resnet18(*, opset: int = 13, with_bn: bool = True, seed: int = 0, width: float = 1.0,
                   num_classes: int | None = None, input_size: int = 32, stem: str | None = None,
                   dynamic_spatial: bool = False, calib_images: int = 16,
                   dead_fraction: float = 0.05) -> onnx.ModelProto:
    return _resnet(basic_block, (2, 2, 2, 2), name="resnet18", opset=opset, with_bn=with_bn,
                   seed=seed, width=width, num_classes=num_classes, input_size=input_size,
                   stem=stem, dynamic_spatial=dynamic_spatial, calib_images=calib_images,
                   dead_fraction=dead_fraction)


@single_thread_blas
def build_resnet50(*, opset: int = 13, with_bn: bool = True, seed: int = 0, width: float = 1.0,
                   num_classes: int | None = None, input_size: int = 32, stem: str | None = None,
                   dynamic_spatial: bool = False, calib_images: int = 16,
                   dead_fraction: float = 0.05) -> onnx.ModelProto:
    return _resnet(bottleneck, (3, 4, 6, 3), name="resnet50", opset=opset, with_bn=with_bn,
                   seed=seed, width=width, num_classes=num_classes, input_size=input_size,
                   stem=stem, dynamic_spatial=dynamic_spatial, calib_images=calib_images,
                   dead_fraction=dead_fraction)


build_resnet18.__doc__ = "ResNet-18 (BasicBlock x [2, 2, 2, 2])." + _RESNET_DOC
build_resnet50.__doc__ = (
    "ResNet-50 (Bottleneck x [3, 4, 6, 3], expansion 4).\n\n"
    "    At ``width=1.0, input_size=224`` it is the real ~25.6M-parameter model\n"
    "    (25.66M initializer scalars: BN running stats included).  Building it\n"
    "    calibrates in NumPy (a few seconds); pass ``calib_images=2`` when only the\n"
    "    structure matters." + _RESNET_DOC
)


# --------------------------------------------------------------------------
# MobileNetV2
# --------------------------------------------------------------------------
_MBV2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                 (6, 160, 3, 2), (6, 320, 1, 1))


@single_thread_blas
def build_mobilenetv2(*, opset: int = 13, with_bn: bool = True, seed: int = 0, width: float = 1.0,
                      num_classes: int | None = None, input_size: int = 32, stem: str | None = None,
                      dynamic_spatial: bool = False, calib_images: int = 16,
                      dead_fraction: float = 0.05) -> onnx.ModelProto:
    """MobileNetV2 (torchvision table ``(t, c, n, s)``), ReLU6 as ``Clip(0, 6)``.

    Parameters
    ----------
    opset, with_bn, seed, num_classes, dynamic_spatial, calib_images, dead_fraction
        As in :func:`build_resnet18`.
    width : float
        ``width_mult``: channels are ``make_divisible(c * width, 8)``; the last
        conv has ``make_divisible(1280 * max(1, width), 8)`` channels (as
        torchvision).
    input_size : int
        Square input size.
    stem : {'cifar', 'imagenet'}, optional
        ``'cifar'`` uses stride 1 in the first conv and in the c=24 stage
        (total stride 8, 4x4 final map at 32x32), the usual CIFAR variant.
        Default: imagenet iff ``input_size >= 128``.

    Returns
    -------
    onnx.ModelProto
    """
    check_common(width=width, input_size=input_size, calib_images=calib_images)
    stem = resolve_stem(stem, input_size)
    num_classes = resolve_classes(num_classes, stem == "imagenet")
    net, x = start(opset=opset, seed=seed, with_bn=with_bn, input_size=input_size,
                   calib_images=calib_images, dynamic_spatial=dynamic_spatial,
                   dead_fraction=dead_fraction)
    cifar = stem == "cifar"
    x = conv_bn_act(net, x, make_divisible(32 * width), 3, stride=1 if cifar else 2, act="relu6",
                    name="features.0")
    k = 1
    for si, (t, c, n, s) in enumerate(_MBV2_SETTING):
        if cifar and si == 1:
            s = 1
        for j in range(n):
            x = inverted_residual(net, x, make_divisible(c * width), s if j == 0 else 1, t,
                                  name=f"features.{k}")
            k += 1
    x = conv_bn_act(net, x, make_divisible(1280 * max(1.0, width)), 1, act="relu6",
                    name=f"features.{k}")
    opts = dict(opset=opset, with_bn=with_bn, seed=seed, width=width, num_classes=num_classes,
                input_size=input_size, stem=stem, dynamic_spatial=dynamic_spatial)
    return finish(net, _head(net, x), num_classes, name="mobilenetv2", options=opts,
                  doc="MobileNetV2 (udfc-onnx synthetic test model)")


# --------------------------------------------------------------------------
# DenseNet-BC
# --------------------------------------------------------------------------
@single_thread_blas
def build_densenet(*, blocks: tuple[int, ...] = (4, 4), growth: int = 12, bn_size: int = 4,
                   reduction: float = 0.5, opset: int = 13, with_bn: bool = True, seed: int = 0,
                   width: float = 1.0, num_classes: int | None = None, input_size: int = 32,
                   stem: str | None = None, dynamic_spatial: bool = False, calib_images: int = 16,
                   dead_fraction: float = 0.05) -> onnx.ModelProto:
    """DenseNet-BC with pre-activation dense layers and incremental Concat.

    Dense layer: BN-ReLU-Conv1x1(``bn_size*growth``)-BN-ReLU-Conv3x3(``growth``),
    output Concat-ed to the layer input along channels.  Transition between
    blocks: BN-ReLU-Conv1x1(``floor(C*reduction)``)-AveragePool 2x2/2.  Final:
    BN-ReLU-GlobalAveragePool-Flatten-Gemm.

    ``with_bn=False`` mimics a real export with BN folding: BNs that directly
    follow a conv (the bottleneck BN, and the stem BN with the ImageNet stem)
    are folded; the *pre-activation* BNs (on a Concat / block input, before a
    ReLU) cannot be folded into any conv and stay as BatchNormalization nodes.
    Both variants compute the same function.  Convs not followed by a BN have
    no bias in either variant.

    Parameters
    ----------
    blocks : tuple of int
        Dense layers per block.
    growth : int
        Growth rate (scaled by ``width``).
    bn_size : int
        Bottleneck width factor (4 in DenseNet-BC).
    reduction : float
        Transition compression (0.5 in DenseNet-BC).
    stem : {'cifar', 'imagenet'}, optional
        ``'cifar'``: Conv3x3(2*growth), no BN.  ``'imagenet'``: Conv7x7/2-BN-
        ReLU-MaxPool3x3/2.  Default: imagenet iff ``input_size >= 128``.
    opset, with_bn, seed, width, num_classes, input_size, dynamic_spatial, calib_images, dead_fraction
        As in :func:`build_resnet18`.

    Returns
    -------
    onnx.ModelProto
    """
    check_common(width=width, input_size=input_size, calib_images=calib_images)
    if not blocks or any(int(b) < 1 for b in blocks):
        raise ValueError(f"blocks must be a non-empty tuple of positive ints, got {blocks}")
    if not 0 < reduction <= 1:
        raise ValueError(f"reduction must be in (0, 1], got {reduction}")
    stem = resolve_stem(stem, input_size)
    num_classes = resolve_classes(num_classes, stem == "imagenet")
    g = scaled(growth, width)
    net, x = start(opset=opset, seed=seed, with_bn=with_bn, input_size=input_size,
                   calib_images=calib_images, dynamic_spatial=dynamic_spatial,
                   dead_fraction=dead_fraction)
    if stem == "imagenet":
        x = conv_bn_act(net, x, 2 * g, 7, stride=2, name="conv0", bn_name="norm0")
        x = net.maxpool(x, 3, 2, 1, name="pool0")
    else:
        x = net.conv(x, 2 * g, 3, name="conv0")
    for bi, n in enumerate(blocks):
        for li in range(n):
            p = f"denseblock{bi + 1}.denselayer{li + 1}"
            h = net.relu(net.bn(x, name=f"{p}.norm1", foldable=False), name=f"{p}.relu1")
            h = net.conv(h, bn_size * g, 1, name=f"{p}.conv1")
            h = net.relu(net.bn(h, name=f"{p}.norm2"), name=f"{p}.relu2")
            h = net.conv(h, g, 3, name=f"{p}.conv2")
            x = net.concat([x, h], name=f"{p}.concat")
        if bi != len(blocks) - 1:
            p = f"transition{bi + 1}"
            x = net.relu(net.bn(x, name=f"{p}.norm", foldable=False), name=f"{p}.relu")
            x = net.conv(x, max(1, int(x.value.shape[1] * reduction)), 1, name=f"{p}.conv")
            x = net.avgpool(x, 2, 2, name=f"{p}.pool")
    x = net.relu(net.bn(x, name="norm5", foldable=False), name="relu5")
    opts = dict(opset=opset, with_bn=with_bn, seed=seed, width=width, num_classes=num_classes,
                input_size=input_size, stem=stem, dynamic_spatial=dynamic_spatial,
                blocks=tuple(blocks), growth=growth)
    return finish(net, _head(net, x), num_classes, name="densenet", options=opts,
                  doc="DenseNet-BC (udfc-onnx synthetic test model)")
