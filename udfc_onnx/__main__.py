import gc

from udfc_onnx.cli import main

# What the imports made lives as long as the process, so the cyclic collector need not walk it:
# its one full pass of a run walked all of it and took 25 ms (ResNet-50-size p30-w8a8 and
# resnet56_nm w8a8 alike; gen-0/1 passes 3 ms). Only in the command's own process: code that
# imports the package keeps its collector as it is.
gc.freeze()
raise SystemExit(main())
