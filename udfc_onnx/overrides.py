"""Per-layer overrides from a ``--config`` file: prune ratio, weight bits or skip, per node name or pattern.

The file is JSON (always) or YAML (``.yaml``/``.yml``, only when PyYAML is installed)::

    {
      "settings": {"prune_ratio": 0.3},            optional: any CompressConfig field
      "layers": {
        "conv1":      {"ratio": 0.5},               exact node name
        "layer3.*":   {"bits": 4},                  glob pattern (fnmatch, case-sensitive)
        "fc":         {"skip": true}
      }
    }

Rules apply in file order: a node matched by several rules gets the fields of all of them, a later
rule overriding a field an earlier one set. ``ratio`` is the fraction of the node's output channels
to prune when the node is the producer of a prunable unit; ``bits`` (2..8) its weight bits;
``skip: true`` leaves its output channels and float weights alone (its input channels still follow
a pruned producer upstream). Every key must match at least one Conv or Gemm node: a config naming
nodes that do not exist is an error, so a typo never silently does nothing.

This module is pure Python: it sees node names and op types, not ONNX.
"""
from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from .errors import InvalidConfigError

__all__ = ["LayerOverride", "OverrideRules", "load_config_file", "LAYER_OPS"]

#: Node types a rule may address (the layers that own weights).
LAYER_OPS = ("Conv", "Gemm")
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class LayerOverride:
    """Settings of one layer that differ from the run's.

    Attributes
    ----------
    ratio : float or None, default=None
        Prune ratio of the unit this layer produces, 0 <= ratio < 1; None keeps the run's.
    bits : int or None, default=None
        Weight bits 2..8; None keeps the run's.
    skip : bool, default=False
        Leave the layer's output channels and float weights alone.
    """

    ratio: float | None = None
    bits: int | None = None
    skip: bool = False

    def merged(self, later: "LayerOverride", given: Iterable[str]) -> "LayerOverride":
        """This override with the fields named in ``given`` taken from ``later``."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update({name: getattr(later, name) for name in given})
        return LayerOverride(**values)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) not in (None, False)}


def _check_layer(key: str, spec, where: str) -> tuple[LayerOverride, tuple[str, ...]]:
    if not isinstance(spec, Mapping):
        raise InvalidConfigError(f"{where}: layers[{key!r}] must be a mapping of ratio/bits/skip, got {type(spec).__name__}")
    unknown = sorted(set(spec) - {"ratio", "bits", "skip"})
    if unknown:
        raise InvalidConfigError(f"{where}: layers[{key!r}] has unknown key(s) {', '.join(map(repr, unknown))} "
                                 "(allowed: ratio, bits, skip)")
    ratio, bits, skip = spec.get("ratio"), spec.get("bits"), spec.get("skip", False)
    if "ratio" in spec and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or math.isnan(ratio)
                            or not 0 <= ratio < 1):
        raise InvalidConfigError(f"{where}: layers[{key!r}].ratio must be a number in [0, 1), got {ratio!r}")
    if "bits" in spec and (isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8):
        raise InvalidConfigError(f"{where}: layers[{key!r}].bits must be an integer in [2, 8], got {bits!r}")
    if not isinstance(skip, bool):
        raise InvalidConfigError(f"{where}: layers[{key!r}].skip must be true or false, got {skip!r}")
    return LayerOverride(ratio, bits, skip), tuple(k for k in ("ratio", "bits", "skip") if k in spec)


@dataclass(frozen=True)
class OverrideRules:
    """The ordered per-layer rules of a config file (not yet matched against a model).

    Attributes
    ----------
    rules : tuple of (str, LayerOverride, tuple of str)
        Pattern, its settings, and the names of the fields the rule sets.
    source : str
        Where the rules came from (for messages).
    """

    rules: tuple = ()
    source: str = "config"

    @classmethod
    def from_mapping(cls, layers: Mapping, source: str = "config") -> "OverrideRules":
        """Validate a ``{pattern: {ratio, bits, skip}}`` mapping."""
        if not isinstance(layers, Mapping):
            raise InvalidConfigError(f"{source}: 'layers' must be a mapping of node name or pattern to settings")
        rules = []
        for key, spec in layers.items():
            if not isinstance(key, str) or not key:
                raise InvalidConfigError(f"{source}: layer keys must be non-empty node names or patterns, got {key!r}")
            override, given = _check_layer(key, spec, source)
            rules.append((key, override, given))
        return cls(tuple(rules), source)

    @property
    def sets_bits(self) -> bool:
        """True when some rule asks for quantized weights."""
        return any(o.bits is not None for _, o, _ in self.rules)

    def resolve(self, nodes: Iterable[tuple[str, str]]) -> dict[str, LayerOverride]:
        """Match the rules against a model's nodes.

        Parameters
        ----------
        nodes : iterable of (str, str)
            (node name, op type) of every node, names unique.

        Returns
        -------
        dict of str to LayerOverride
            Node name -> its merged override, for every Conv/Gemm some rule matched.

        Raises
        ------
        InvalidConfigError
            A key names no node, names a node that is not a Conv/Gemm, or a pattern matches no Conv/Gemm.
        """
        nodes = list(nodes)
        op_of = dict(nodes)
        layers = [name for name, op in nodes if op in LAYER_OPS]
        resolved: dict[str, LayerOverride] = {}
        missing, not_layers = [], []
        for key, override, given in self.rules:
            if _GLOB_CHARS & set(key):
                matched = [n for n in layers if fnmatch.fnmatchcase(n, key)]
            elif key in op_of:
                matched = [key] if op_of[key] in LAYER_OPS else []
                if not matched:
                    not_layers.append(f"{key} ({op_of[key]})")
                    continue
            else:
                matched = []
            if not matched:
                missing.append(key)
            for name in matched:
                resolved[name] = resolved.get(name, LayerOverride()).merged(override, given)
        if missing:
            raise InvalidConfigError(f"{self.source} names nodes not in the model: {', '.join(missing[:8])}"
                                     f"{' ...' if len(missing) > 8 else ''} (Conv/Gemm names: "
                                     f"`python -m udfc_onnx inspect IN`)")
        if not_layers:
            raise InvalidConfigError(f"{self.source} names nodes that are not Conv or Gemm: {', '.join(not_layers[:8])}")
        return resolved

    def to_dict(self) -> dict:
        return {key: override.to_dict() for key, override, _ in self.rules}


def _parse_text(text: str, path: Path):
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise InvalidConfigError(f"{path}: YAML config needs PyYAML, which is not installed "
                                     "(pip install pyyaml, or write the same content as JSON)") from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise InvalidConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidConfigError(f"{path}: not valid JSON: {exc}") from None


def load_config_file(path: str | Path, config_fields: Iterable[str]) -> tuple[dict, OverrideRules | None]:
    """Read a ``--config`` file.

    Parameters
    ----------
    path : str or Path
    config_fields : iterable of str
        Names allowed in the ``settings`` block (the fields of CompressConfig).

    Returns
    -------
    settings : dict
        Run settings from the file (validated later, by CompressConfig).
    rules : OverrideRules or None
        The per-layer rules, None when the file has no ``layers`` block.

    Raises
    ------
    InvalidConfigError
        Unreadable file, bad syntax, unknown keys, or values out of range.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidConfigError(f"{p}: cannot read config file ({exc.strerror if isinstance(exc, OSError) else exc})") from None
    data = _parse_text(text, p)
    if not isinstance(data, Mapping):
        raise InvalidConfigError(f"{p}: a config file is a mapping with 'settings' and/or 'layers'")
    unknown = sorted(set(data) - {"settings", "layers"})
    if unknown:
        raise InvalidConfigError(f"{p}: unknown top-level key(s) {', '.join(map(repr, unknown))} (allowed: settings, layers)")
    settings = data.get("settings") or {}
    if not isinstance(settings, Mapping):
        raise InvalidConfigError(f"{p}: 'settings' must be a mapping of option names to values")
    allowed = set(config_fields)
    bad = sorted(set(settings) - allowed)
    if bad:
        raise InvalidConfigError(f"{p}: unknown setting(s) {', '.join(map(repr, bad))} (known: {', '.join(sorted(allowed))})")
    rules = OverrideRules.from_mapping(data["layers"], str(p)) if data.get("layers") is not None else None
    return dict(settings), rules
