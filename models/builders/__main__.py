"""``python -m models.builders NAME OUT.onnx [--opset N] [--no-bn] [--width W] [--seed S]``."""

from __future__ import annotations

import argparse
import sys

import onnx

from . import BUILDERS, count_params


def main(argv: list[str] | None = None) -> int:
    """Build registry model ``NAME`` with its defaults (plus overrides) and save it."""
    p = argparse.ArgumentParser(prog="python -m models.builders", description=main.__doc__)
    p.add_argument("name", choices=sorted(BUILDERS), metavar="NAME",
                   help="one of: " + ", ".join(sorted(BUILDERS)))
    p.add_argument("out", metavar="OUT.onnx")
    p.add_argument("--opset", type=int, default=None, help="default-domain opset (default 13)")
    p.add_argument("--no-bn", action="store_true", help="fold BN into convs (with_bn=False)")
    p.add_argument("--width", type=float, default=None, help="channel multiplier override")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--input-size", type=int, default=None)
    p.add_argument("--num-classes", type=int, default=None)
    a = p.parse_args(argv)
    kw = {k: v for k, v in dict(opset=a.opset, width=a.width, seed=a.seed,
                                input_size=a.input_size, num_classes=a.num_classes).items()
          if v is not None}
    if a.no_bn:
        kw["with_bn"] = False
    model = BUILDERS[a.name](**kw)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, a.out)
    print(f"{a.name}: {len(model.graph.node)} nodes, {count_params(model):,} params -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
