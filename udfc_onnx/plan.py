"""The plan: which channels each unit keeps, decided before anything is solved or rewritten."""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

from .solve import channel_scores, keep_count, select_keep
from .units import PruneUnit, Skip

__all__ = ["UnitPlan", "Plan", "make_plan", "restrict_to_layers", "inspect_records", "render_inspect", "inspect_model",
           "reason_label", "underdetermined_units"]


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
        Layers that are not pruned, with the reason.
    weight_bits : int or None
    """

    units: list[UnitPlan] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    weight_bits: int | None = None

    def to_json(self) -> str:
        """Serialise (round-trips through :meth:`from_json`)."""
        return json.dumps({"units": [{"unit": u.unit.to_dict(), "keep": list(u.keep)} for u in self.units],
                           "skipped": [asdict(s) for s in self.skipped],
                           "weight_bits": self.weight_bits}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        data = json.loads(text)
        units = [UnitPlan(PruneUnit.from_dict(u["unit"]), tuple(u["keep"])) for u in data["units"]]
        return cls(units, [Skip(**s) for s in data["skipped"]], data["weight_bits"])


def _group_scores(unit: PruneUnit, raw_filters: dict[str, np.ndarray], criterion: str) -> np.ndarray:
    """Channel importance of a group: the producer's filter norms, or for several producers the
    sum of each producer's norms divided by its mean (so no producer dominates by scale alone)."""
    producers = unit.all_producers
    if len(producers) == 1:
        return channel_scores(raw_filters[producers[0]], criterion)
    total = np.zeros(unit.channels)
    for name in producers:
        s = channel_scores(raw_filters[name], criterion)
        total += s / max(float(s.mean()), 1e-12)
    return total


def make_plan(
    units: list[PruneUnit], skipped: list[Skip], raw_filters: dict[str, np.ndarray], *,
    prune_ratio: float, criterion: str, weight_bits: int | None, overrides: Mapping | None = None,
    channel_multiple: int = 1,
) -> Plan:
    """Rank each unit's channels on its raw filters and keep the top int(C*(1-r)).

    ``channel_multiple`` rounds each kept count up to a multiple of it (``solve.keep_count``).

    Parameters
    ----------
    raw_filters : dict of str to ndarray of shape (C, ...)
        Producer name -> its weights before BN folding, output channels first (Neuron Merging
        ranks those).
    overrides : mapping of str to LayerOverride, optional
        Per-layer settings from ``--config`` by node name: a producer's ``ratio`` replaces
        ``prune_ratio`` for its unit, ``skip`` keeps all its channels.
    """
    planned = []
    for unit in units:
        override = (overrides or {}).get(unit.producer)
        ratio = override.ratio if override is not None and override.ratio is not None else prune_ratio
        n_keep = unit.channels if override is not None and override.skip else keep_count(unit.channels, ratio,
                                                                                             channel_multiple)
        if n_keep >= unit.channels:
            keep = tuple(range(unit.channels))
        else:
            keep = tuple(int(i) for i in select_keep(_group_scores(unit, raw_filters, criterion), n_keep))
        planned.append(UnitPlan(unit, keep))
    return Plan(planned, list(skipped), weight_bits)


def restrict_to_layers(plan: Plan, layers) -> Plan:
    """Move every unit that names a layer the solver cannot rewrite into ``skipped``, with the reason.

    ``layers`` maps the names of the rewritable Conv/Gemm layers to their descriptions.
    """
    kept, skipped = [], list(plan.skipped)
    for up in plan.units:
        unit = up.unit
        names = list(unit.all_producers) + [c.node for c in unit.consumers] + \
            [m.node for m in unit.members if m.op == "Conv"]
        missing = [n for n in names if n not in layers]
        if missing:
            for p in unit.all_producers:
                skipped.append(Skip(p, f"layer {missing[0]} of the group cannot be rewritten (weight or bias not a "
                                       "constant used only there)"))
        else:
            kept.append(up)
    return Plan(kept, skipped, plan.weight_bits)


# ---------------------------------------------------------------------------------------------
# inspect: every group and every layer left alone
# ---------------------------------------------------------------------------------------------
def underdetermined_units(plan: Plan, raw_filters: dict[str, np.ndarray]) -> set[str]:
    """Producers whose kept filters will span their whole (pruned) input space: t >= d.

    The solver then moves only the mean (``compensate._regression_identifiable``); this predicts
    it from the plan for ``inspect``: d is the producer's filter size after the groups that feed
    it removed their input channels.
    """
    removed: dict[str, int] = {}
    for up in plan.units:
        for c in up.unit.consumers:
            removed[c.node] = removed.get(c.node, 0) + len(up.drop) * c.block
    out = set()
    for up in plan.units:
        name = up.unit.producer
        if not up.drop or name not in raw_filters:
            continue
        w = raw_filters[name]
        per_input = int(np.prod(w.shape[2:])) if w.ndim > 2 else 1
        d = int(np.prod(w.shape[1:])) - removed.get(name, 0) * per_input
        if len(up.keep) >= d:
            out.add(name)
    return out


def inspect_records(plan: Plan, fold_skipped: list[tuple[str, str]] = (), underdetermined=frozenset()) -> dict:
    """What the tool would do with each group and why it leaves each other layer alone.

    Returns
    -------
    dict
        ``groups``: one record per group (producers, channels, kept, kind, compensation, consumers
        with offsets and per-consumer compensation, members, notes); ``left_alone``: node and
        reason; ``not_folded``: BN nodes kept in the graph and why; ``summary``: counts.
    """
    groups = []
    for up in plan.units:
        u = up.unit
        compensation, notes = u.compensation, list(u.notes)
        if u.producer in underdetermined and compensation in ("full", "mixed"):
            compensation = "mean"
            notes.insert(0, f"{len(up.keep)} kept filters span the producer's whole pruned input space (t >= d): "
                            "no unique regression, only the mean is compensated")
        groups.append({
            "producers": list(u.all_producers), "channels": u.channels, "keep": len(up.keep), "kind": u.kind,
            "compensation": compensation,
            "consumers": [{"node": c.node, "offset": c.offset, "block": c.block, "compensation": c.compensation,
                           "via": list(c.path), "note": c.note} for c in u.consumers],
            "members": [{"node": m.node, "op": m.op, "offset": m.offset} for m in u.members],
            "notes": notes,
        })
    left = [{"node": s.node, "reason": s.reason} for s in plan.skipped]
    summary = {"groups": len(groups), "compensated": sum(g["compensation"] == "full" for g in groups),
               "mean_only": sum(g["compensation"] == "mean" for g in groups),
               "uncompensated": sum(g["compensation"] in ("none", "mixed") for g in groups),
               "left_alone": len(left),
               "left_alone_reasons": dict(Counter(reason_label(s.reason) for s in plan.skipped))}
    return {"summary": summary, "groups": groups, "left_alone": left,
            "not_folded": [{"node": bn, "reason": r} for bn, r in fold_skipped]}


def reason_label(reason: str) -> str:
    """A short label for a skip reason (for summaries)."""
    for key, label in (("residual", "residual stream"), ("graph output", "graph output"),
                       ("not a standard ONNX op", "unknown op"), ("not known", "unknown op"),
                       ("grouped conv", "grouped conv"), ("depthwise", "depthwise of a left-alone group"),
                       ("weight", "weight not owned"), ("joined", "joined with unprunable channels")):
        if key in reason:
            return label
    return "other"


def render_inspect(records: dict) -> str:
    """Plain-text form of :func:`inspect_records`."""
    s = records["summary"]
    lines = [f"{s['groups']} prunable units (channel groups: {s['compensated']} with full compensation, "
             f"{s['mean_only']} mean-only, "
             f"{s['uncompensated']} without or mixed), {s['left_alone']} layer(s) left alone"]
    for g in records["groups"]:
        prods = ", ".join(g["producers"])
        keep = f", keep {g['keep']}" if g["keep"] < g["channels"] else ""
        lines.append(f"  prune  {prods} ({g['channels']} ch{keep}) [{g['kind']}] compensation {g['compensation']}")
        for c in g["consumers"]:
            where = f" @{c['offset']}" if c["offset"] else ""
            block = f" x{c['block']} cols" if c["block"] > 1 else ""
            via = " -> ".join(c["via"]) or "direct"
            lines.append(f"         -> {c['node']}{where}{block} via {via}: {c['compensation']}")
        for m in g["members"]:
            lines.append(f"         slices {m['op']} {m['node']}" + (f" @{m['offset']}" if m["offset"] else ""))
        for note in g["notes"]:
            lines.append(f"         note: {note}")
    for item in records["left_alone"]:
        lines.append(f"  leave  {item['node']}: {item['reason']}")
    for item in records["not_folded"]:
        lines.append(f"  no-fold {item['node']}: {item['reason']}")
    return "\n".join(lines)


def inspect_model(path, config) -> tuple[dict, str]:
    """Load ``path`` and return (:func:`inspect_records`, :func:`render_inspect`) for ``config``.

    Raises the loader's one-line errors (:class:`udfc_onnx.errors.UdfcError`) for bad input.
    """
    from .load import read_model
    from .pipeline import analyze  # the pipeline imports this module

    # weights stay in the file (udfc_onnx.lazy) and raw filters are read one at a time: the folded
    # weights (a dict nobody keeps) are the only weight-sized thing held
    _, _, raw_filters, plan, fold = analyze(read_model(path).model, config, inplace=True, folded_weights={})
    records = inspect_records(plan, fold.skipped, underdetermined_units(plan, raw_filters))
    return records, render_inspect(records)
