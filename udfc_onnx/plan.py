"""The plan: which channels each unit keeps, decided before anything is solved or rewritten."""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

from .solve import channel_scores, keep_count, select_keep
from .units import ConsumerSlice, PruneUnit, Skip

__all__ = ["UnitPlan", "Plan", "make_plan"]


@dataclass(frozen=True)
class UnitPlan:
    """One unit and the channels it keeps (sorted, in producer-channel coordinates)."""

    unit: PruneUnit
    keep: tuple[int, ...]

    @property
    def drop(self) -> tuple[int, ...]:
        kept = set(self.keep)
        return tuple(c for c in range(self.unit.channels) if c not in kept)


@dataclass
class Plan:
    """What a run prunes and quantizes.

    Attributes
    ----------
    units : list of UnitPlan
    skipped : list of Skip
        Convs that are not pruned, with the reason.
    weight_bits : int or None
    """

    units: list[UnitPlan] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    weight_bits: int | None = None

    def to_json(self) -> str:
        """Serialise (round-trips through :meth:`from_json`)."""
        return json.dumps({"units": [asdict(u) for u in self.units], "skipped": [asdict(s) for s in self.skipped],
                           "weight_bits": self.weight_bits}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        data = json.loads(text)
        units = []
        for u in data["units"]:
            raw = u["unit"]
            unit = PruneUnit(raw["producer"], raw["channels"], tuple(raw["path"]),
                             tuple(ConsumerSlice(**c) for c in raw["consumers"]), raw["activation"], raw["linear_path"])
            units.append(UnitPlan(unit, tuple(u["keep"])))
        return cls(units, [Skip(**s) for s in data["skipped"]], data["weight_bits"])


def make_plan(
    units: list[PruneUnit], skipped: list[Skip], raw_filters: dict[str, np.ndarray], *,
    prune_ratio: float, criterion: str, weight_bits: int | None, overrides: Mapping | None = None,
) -> Plan:
    """Rank each unit's channels on its raw filters and keep the top int(C*(1-r)).

    Parameters
    ----------
    raw_filters : dict of str to ndarray of shape (C, ...)
        Producer name -> its weights before BN folding (Neuron Merging ranks those).
    overrides : mapping of str to LayerOverride, optional
        Per-layer settings from ``--config`` by node name: a producer's ``ratio`` replaces
        ``prune_ratio`` for its unit, ``skip`` keeps all its channels.
    """
    planned = []
    for unit in units:
        override = (overrides or {}).get(unit.producer)
        ratio = override.ratio if override is not None and override.ratio is not None else prune_ratio
        n_keep = unit.channels if override is not None and override.skip else keep_count(unit.channels, ratio)
        if n_keep >= unit.channels:
            keep = tuple(range(unit.channels))
        else:
            keep = tuple(int(i) for i in select_keep(channel_scores(raw_filters[unit.producer], criterion), n_keep))
        planned.append(UnitPlan(unit, keep))
    return Plan(planned, list(skipped), weight_bits)
