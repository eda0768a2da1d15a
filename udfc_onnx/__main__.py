from udfc_onnx.cli import main

raise SystemExit(main())
