"""Synthetic ONNX test models for ``udfc-onnx``.

The graphs are built directly with :mod:`onnx.helper` (no PyTorch) by
:mod:`models.builders`; see ``models.builders.BUILDERS`` for the registry and
``python -m models.builders --help`` for the command-line writer.
"""
