"""Option handling shared by all builders."""

from __future__ import annotations

from ._net import Net, calibration_batch

#: Inputs at least this large get the ImageNet stem / 1000 classes by default.
IMAGENET_MIN_SIZE = 128


def scaled(c: int, width: float) -> int:
    """``c * width`` rounded, at least 1 (plain channel multiplier)."""
    return max(1, int(round(c * width)))


def make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's ``_make_divisible`` (MobileNet channel rounding)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def check_common(*, width: float, input_size: int, calib_images: int) -> None:
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width}")
    if int(input_size) < 1:
        raise ValueError(f"input_size must be >= 1, got {input_size}")
    if int(calib_images) < 2:
        raise ValueError(f"calib_images must be >= 2 (BN variance), got {calib_images}")


def start(*, opset: int, seed: int, with_bn: bool, input_size: int, calib_images: int,
          dynamic_spatial: bool = False, channels: int = 3, dead_fraction: float = 0.05):
    """Create the :class:`Net` and its ``input`` tensor (fed the calibration batch)."""
    net = Net(opset=opset, seed=seed, with_bn=with_bn, dead_fraction=dead_fraction)
    x = net.input(calibration_batch(channels, int(input_size), int(calib_images), seed),
                  dynamic_spatial=dynamic_spatial)
    return net, x


def resolve_stem(stem: str | None, input_size: int) -> str:
    if stem is None:
        return "imagenet" if input_size >= IMAGENET_MIN_SIZE else "cifar"
    if stem not in ("cifar", "imagenet"):
        raise ValueError(f"stem must be 'cifar', 'imagenet' or None, got {stem!r}")
    return stem


def resolve_classes(num_classes: int | None, imagenet: bool) -> int:
    if num_classes is None:
        return 1000 if imagenet else 10
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return int(num_classes)


def finish(net: Net, feats, num_classes: int, *, name: str, options: dict, doc: str):
    """Classifier ``Gemm`` named ``logits`` + model assembly with metadata."""
    logits = net.gemm(feats, num_classes, init="lecun", name="fc", out_name="logits")
    meta = {"builder": name, **options}
    return net.model(logits, graph_name=name, doc=doc, metadata=meta)
