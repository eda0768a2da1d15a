"""Channel dependency analysis of a BN-folded graph: coupled channel groups, and a reason for every
layer left alone.

A *group* (Torch-Pruning's word) is a set of channels that must be removed together: the output
channels of its producer(s), the per-channel parameters of every op they pass through (an unfolded
BatchNormalization, a PRelu slope, a depthwise conv's filters), and the input slices of every
consumer that reads them. ``PruneUnit`` is one group.

How groups are found (``handlers`` says what each op does to channels):

1. Union the tensors that carry the same channels: the input and output of every channel-wise
   link, and every data input and the output of a coupling op (residual Add, gating Mul).
2. A class whose producers are all prunable Conv/Gemm layers is a root. Several producers in one
   class is a residual stream: left alone unless ``prune_residual`` (then one group, no filter
   compensation: there is no single filter set whose combination could stand in for a channel).
3. From the root's producers, walk forward through links, concats (channel c of input k becomes
   ``offset_k + c``) and flattens (channel c becomes a block of H*W columns) to the consumers.
   Anything else on the way (an unknown op, a graph output, a grouped conv) leaves the group alone.
4. Each consumer's path decides what compensation is valid (spec sections 2.3, 2.7, 5):

   * ``full``: pruned filters regressed on kept ones, folded into the consumer, plus the
     mean-residual bias transfer. Valid with at most one elementwise nonlinearity (Relu, Clip,
     LeakyRelu, PRelu, Sigmoid: approximate, as in the paper) and any number of per-channel affine
     ops (an unfolded BN multiplies the coefficient by its ratio ``a_j / a_i``, spec 5: DenseNet).
   * ``mean``: only the expected value of the pruned channels moves into the consumer bias. Used
     when a depthwise conv sits on the path (its kernels differ per channel, so no combination of
     kept channels stands in for a pruned one) or when two nonlinearities do.
   * ``none``: plain pruning: several producers; or a nonlinearity on the path and no mean
     correction available (no BN statistics, or no closed-form mean for the activation), because
     the regression through a nonlinearity without that correction measured worse than pruning.

   A regression with as many kept filters as filter entries (t >= d, e.g. a 1x1 conv or Gemm whose
   inputs an earlier group pruned) has no unique solution; the solver then transfers the mean only.

Where the compensation assumptions hold, per activation between producer and consumer:

   ==========  =============================================================================
   none        exact in the linear regime (the regression and the mean transfer)
   Relu        the paper's case: approximate for the pruning combination; the quantization
               scale commutes (s > 0); mean transfer exact under the Gaussian BN assumption
   LeakyRelu,  like Relu (positively homogeneous)
   PRelu
   Clip        (ReLU6) approximate for both: saturation breaks homogeneity; closed-form mean
   Sigmoid     approximate (saturating, not homogeneous); probit mean
   MaxPool     approximate (max does not commute with a combination); mean taken before it
   others      (Tanh, x*sigmoid(x) gating, ...) no closed-form mean: pruned without compensation
   ==========  =============================================================================
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import onnx

from .graph import GraphView, attribute
from .handlers import (AFFINE, DEPTHWISE, IDENTITY, LINEAR, MAX, NONLINEAR, ChannelShapes, Context, Role,
                       classify)

__all__ = ["ConsumerSlice", "ChannelMember", "PruneUnit", "Skip", "find_units", "member_arrays", "raw_filters_of",
           "RawFilterReader", "limit_to_statistics"]


@dataclass(frozen=True)
class ConsumerSlice:
    """Where a group's channels enter a consumer, and what lies between producer and consumer.

    Attributes
    ----------
    node : str
        Consumer Conv or Gemm.
    kind : {"conv", "gemm"}
    block : int
        Inputs per channel on the consumer's reduction axis beyond the channel itself:
        1 for a conv (its kernel taps are kept separately), H*W for a Gemm after Flatten.
    offset : int
        First input channel of the group in the consumer (non-zero after a Concat), in the
        consumer's original channel numbering.
    path : tuple of str
        Channel-wise nodes from the producer to this consumer.
    compensation : {"full", "mean", "none"}
        What the solver may do for this consumer (module docstring).
    scale_by : tuple of str
        Affine members on the path (unfolded BN, Mul, Div) whose per-channel scale turns the
        producer-side coefficient c_ij into c_ij * d_j / d_i for this consumer.
    stats_from : str
        Member BN node, depthwise conv or producer whose BN statistics describe the channel's
        pre-activation for the mean transfer ("" when there is none).
    activation : str
        Nonlinearity after ``stats_from`` ("none", "relu", "clip", "leakyrelu", "prelu", "sigmoid", ...).
    activation_args : tuple of float
        (low, high, slope) of that activation.
    note : str
        Why compensation is limited or approximate.
    taps : tuple of float
        Conv consumers on a map of known size: for each kernel tap (row-major), the fraction of
        output positions where it reads inside the map rather than padding. The mean transfer
        weights taps by it (a 3x3 conv on a 2x2 map reads 4 of its 9 taps per output); empty
        when every tap always reads the map or the size is unknown.
    nonlinear : bool
        The path holds an elementwise nonlinearity or a max pool.
    """

    node: str
    kind: str
    block: int = 1
    offset: int = 0
    path: tuple[str, ...] = ()
    compensation: str = "full"
    scale_by: tuple[str, ...] = ()
    stats_from: str = ""
    activation: str = "none"
    activation_args: tuple[float, ...] = ()
    note: str = ""
    taps: tuple[float, ...] = ()
    nonlinear: bool = False


@dataclass(frozen=True)
class ChannelMember:
    """Per-channel parameters sliced with a group.

    Attributes
    ----------
    node : str
    op : str
        "BatchNormalization" (arrays: scale, bias, mean, var), "Conv" (depthwise weight[, bias]),
        "PRelu", "InstanceNormalization", "Mul", "Div" (x / c), "Add", "Sub", "Max", "Min", "Pow",
        or "Reshape" (a target shape whose feature count shrinks with the group).
    arrays : tuple of str
        Initializer names.
    axes : tuple of int
        Channel axis of each array.
    offset : int
        First channel of the group in the arrays (original numbering, in blocks).
    block : int
        Entries per channel on that axis (H*W for a BN over flattened features).
    eps : float
        BN epsilon.
    """

    node: str
    op: str
    arrays: tuple[str, ...]
    axes: tuple[int, ...]
    offset: int = 0
    block: int = 1
    eps: float = 0.0


@dataclass(frozen=True)
class PruneUnit:
    """A group of coupled channels and the consumers that absorb the compensation.

    Attributes
    ----------
    producer : str
        The (first) Conv/Gemm whose output channels are pruned; it ranks the channels.
    channels : int
        Channels in the group.
    path : tuple of str
        Every channel-wise node between producer(s) and consumers.
    consumers : tuple of ConsumerSlice
    activation : str
        "relu" or "none" for a plain unit, else the first nonlinearity on the paths.
    linear_path : bool
        True when every op on the paths is linear per channel (compensation exact in the
        linear regime).
    producers : tuple of str
        All producers when there are several (a residual stream), else empty.
    members : tuple of ChannelMember
        Per-channel parameters sliced with the group.
    kind : str
        "chain", "branch", "concat", "flatten", "depthwise", "residual" joined by "+".
    compensation : {"full", "mean", "none", "mixed"}
        Summary of the consumers' compensation.
    notes : tuple of str
        Assumptions and limits, for ``inspect``.
    """

    producer: str
    channels: int
    path: tuple[str, ...]
    consumers: tuple[ConsumerSlice, ...]
    activation: str
    linear_path: bool
    producers: tuple[str, ...] = ()
    members: tuple[ChannelMember, ...] = ()
    kind: str = "chain"
    compensation: str = "full"
    notes: tuple[str, ...] = ()

    @property
    def all_producers(self) -> tuple[str, ...]:
        return self.producers or (self.producer,)

    @property
    def is_simple(self) -> bool:
        """One producer, no members, Relu or no activation, full compensation from the producer's BN.

        The foundation's per-unit solver handles exactly these; groups go through the group solver.
        """
        nodes = [c.node for c in self.consumers]
        return (len(self.all_producers) == 1 and not self.members and self.activation in ("relu", "none")
                and len(set(nodes)) == len(nodes)
                and all(c.compensation == "full" and not c.scale_by and c.stats_from in ("", self.producer)
                        for c in self.consumers))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "PruneUnit":
        consumers = tuple(ConsumerSlice(**{k: tuple(v) if isinstance(v, list) else v for k, v in c.items()})
                          for c in raw["consumers"])
        members = tuple(ChannelMember(**{k: tuple(v) if isinstance(v, list) else v for k, v in m.items()})
                        for m in raw.get("members", ()))
        return cls(raw["producer"], raw["channels"], tuple(raw["path"]), consumers, raw["activation"],
                   raw["linear_path"], tuple(raw.get("producers", ())), members, raw.get("kind", "chain"),
                   raw.get("compensation", "full"), tuple(raw.get("notes", ())))


@dataclass(frozen=True)
class Skip:
    """A layer left alone and why."""

    node: str
    reason: str


class _UnionFind:
    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


class _Fail(Exception):
    pass


@dataclass
class _Analysis:
    view: GraphView
    ctx: Context
    roles: dict[str, Role]
    classes: _UnionFind
    gates: set[str] = field(default_factory=set)
    couplers: dict[str, list[str]] = field(default_factory=dict)
    order: dict[str, int] = field(default_factory=dict)

    # ------------------------------------------------------------------ channel counts
    def channels(self, tensor: str, _depth: int = 0) -> int | None:
        """Channel count (axis 1) of a tensor: shape inference, else traced back to its layers."""
        c = self.ctx.shapes.dim(tensor, 1)
        if c:
            return c
        node = self.view.producer.get(tensor)
        if node is None or _depth > 500:
            return None
        role = self.roles[node.name]
        if role.kind == "layer":
            w = self.view.initializers[node.input[1]]
            return int(w.dims[0] if role.layer_kind == "conv" or attribute(node, "transB", 0) else w.dims[1])
        if role.kind in ("link", "couple"):
            return self.channels(node.input[role.data_inputs[0]], _depth + 1)
        if role.kind == "concat":
            parts = [self.channels(i, _depth + 1) for i in node.input]
            return None if any(p is None for p in parts) else int(sum(parts))
        return None

    def flatten_block(self, node: onnx.NodeProto) -> int:
        role = self.roles[node.name]
        if role.flatten_block:
            return role.flatten_block
        # dynamic spatial dims: the Gemm(s) reading the flattened map fix H*W = K / C
        c = self.channels(node.input[0])
        for user in self.view.consumers.get(node.output[0], []):
            if user.op_type == "Gemm" and user.input[0] == node.output[0] and c:
                w = self.view.initializers.get(user.input[1])
                if w is not None and len(w.dims) == 2:
                    k = w.dims[1] if attribute(user, "transB", 0) else w.dims[0]
                    if k % c == 0:
                        return k // c
        raise _Fail(f"{node.op_type} {node.name}: spatial size of the flattened map unknown")

    # ------------------------------------------------------------------ forward walk
    def trace(self, producers: list[onnx.NodeProto]):
        """Consumers and members reached from ``producers``' outputs; raises _Fail with the reason."""
        root = self.classes.find(producers[0].output[0])
        stack = [(p.output[0], 0, 1, ()) for p in producers]
        seen: set[tuple[str, int]] = set()
        consumers: dict[str, tuple] = {}
        members: dict[tuple[str, int], tuple] = {}
        while stack:
            tensor, offset, block, path = stack.pop()
            if (tensor, offset) in seen:
                continue
            seen.add((tensor, offset))
            if tensor in self.view.graph_outputs:
                raise _Fail(f"channels reach the graph output '{tensor}'")
            for node in self.view.consumers.get(tensor, []):
                role = self.roles[node.name]
                where = [i for i, name in enumerate(node.input) if name == tensor]
                step = path + (node.name,)
                if role.kind == "link":
                    if where != [role.data_inputs[0]]:
                        raise _Fail(f"channels reach {node.op_type} {node.name} as a parameter, not as data")
                    if role.params:
                        members[(node.name, offset)] = (node, role, offset, block)
                    stack.append((node.output[0], offset, block, step))
                elif role.kind == "couple":
                    if node.name in self.gates:
                        stack.append((node.output[0], offset, block, step))
                        continue
                    if offset or block != 1:
                        raise _Fail(f"channels reach {node.op_type} {node.name} after a concat or flatten, "
                                    "mixed with other channels")
                    if any(self.classes.find(node.input[i]) != root for i in role.data_inputs):
                        raise _Fail(f"{node.op_type} {node.name} couples the channels with another stream")
                    stack.append((node.output[0], offset, block, step))
                elif role.kind == "concat":
                    for position in where:  # the same tensor may be concatenated more than once
                        before = 0
                        for name in node.input[:position]:
                            c = self.channels(name)
                            if c is None:
                                raise _Fail(f"Concat {node.name}: channel count of input '{name}' unknown")
                            before += c
                        stack.append((node.output[0], offset + before * block, block, step))
                elif role.kind == "flatten":
                    if block != 1:
                        raise _Fail(f"{node.op_type} {node.name} flattens an already flattened tensor")
                    hw = self.flatten_block(node)
                    stack.append((node.output[0], offset * hw, hw, step))
                    if role.notes:
                        members[(node.name, offset)] = (node, role, offset, hw)
                elif role.kind == "layer":
                    if where != [0]:
                        raise _Fail(f"channels reach {node.op_type} {node.name} as a weight or bias, not as data")
                    if not role.consumes:
                        raise _Fail(f"consumer {node.name}: {role.consume_reason}")
                    if role.layer_kind == "conv" and block != 1:
                        raise _Fail(f"Conv {node.name} reads a flattened tensor")
                    if offset % block:
                        raise _Fail(f"Gemm {node.name}: channel block not aligned with its columns")
                    consumers[(node.name, offset)] = (node, role, offset // block, block, path)
                elif role.kind == "shape":
                    continue
                else:
                    raise _Fail(f"channels reach {role.reason}")
        return consumers, members

    # ------------------------------------------------------------------ path semantics
    def describe_path(self, producer: str, path: tuple[str, ...], several: bool) -> dict:
        """Compensation, scale members, statistics source and activation for one consumer path."""
        if several:
            return dict(compensation="none", note="several producers share these channels: no single filter set "
                                                  "to regress on; pruned without compensation")
        steps = [(name, self.roles[name]) for name in path]
        effects = [r.effect if r.kind == "link" else (NONLINEAR if name in self.gates else IDENTITY)
                   for name, r in steps]
        depthwise = [name for (name, _), e in zip(steps, effects) if e == DEPTHWISE]
        nonlinear = [name for (name, _), e in zip(steps, effects) if e == NONLINEAR]
        scale_by = tuple(name for (name, r), e in zip(steps, effects)
                         if e == AFFINE and r.params and self.view.nodes_by_name[name].op_type
                         in ("BatchNormalization", "Mul", "Div"))
        # statistics: the last BN before the consumer (unfolded member, or folded into a conv on the path)
        stats_from, after = producer, steps
        for k in range(len(steps) - 1, -1, -1):
            name, role = steps[k]
            op = self.view.nodes_by_name[name].op_type
            if op == "BatchNormalization" or (effects[k] == DEPTHWISE):
                stats_from, after = name, steps[k + 1:]
                break
        after_effects = [r.effect if r.kind == "link" else (NONLINEAR if name in self.gates else IDENTITY)
                         for name, r in after]
        acts = [(name, r) for (name, r), e in zip(after, after_effects) if e == NONLINEAR]
        activation, args, no_mean = "none", (), ""
        if len(acts) > 1:
            no_mean = f"{len(acts)} nonlinearities after the last BN"
        elif any(e in (AFFINE, DEPTHWISE) for e in after_effects):
            no_mean = "a per-channel affine op after the last BN (its effect on the mean is not tracked)"
        if acts:
            name, role = acts[0]
            act = role.activation
            if name in self.gates or act is None:
                activation = "gate"
                no_mean = no_mean or f"no closed-form mean for the gating {name} (x * f(x))"
            else:
                activation, args = act.kind, (float(act.low), float(act.high), float(act.slope))
                if act.kind not in ("relu", "clip", "leakyrelu", "prelu", "sigmoid"):
                    no_mean = no_mean or f"no closed-form mean for {act.kind}"
        mean_ok = not no_mean
        maxpool = any(e == MAX for e in effects)
        notes = []
        if depthwise:
            compensation = "mean" if mean_ok else "none"
            notes.append(f"depthwise {depthwise[0]} on the path: its kernel differs per channel, so kept channels "
                         "cannot stand in for a pruned one; "
                         + ("only the pruned channels' mean moves to the consumer bias" if mean_ok else
                            f"pruned without compensation ({no_mean})"))
        elif len(nonlinear) > 1:
            compensation = "mean" if mean_ok else "none"
            notes.append(f"{len(nonlinear)} nonlinearities on the path ({', '.join(nonlinear)}): no filter "
                         "compensation; " + ("only the mean is transferred" if mean_ok else no_mean))
        elif (nonlinear or maxpool) and not mean_ok:
            # without the mean correction the regression through a nonlinearity measured worse than
            # plain pruning (spec section 9), so it is not applied
            compensation = "none"
            notes.append(f"{no_mean}: without the mean correction the regression through a nonlinearity does "
                         "worse than plain pruning; pruned without compensation")
        else:
            compensation = "full"
            if nonlinear:
                notes.append(_ACTIVATION_NOTES.get(activation, f"{activation}: approximate"))
            if maxpool:
                notes.append("max pooling: approximate (max does not commute with a combination of channels)")
        return dict(compensation=compensation, scale_by=scale_by, stats_from=stats_from if mean_ok else "",
                    activation=activation, activation_args=args, note="; ".join(notes),
                    nonlinear=bool(nonlinear) or maxpool)


_ACTIVATION_NOTES = {
    "relu": "relu: approximate, as in the paper (exact for positive quant scales, not for combinations)",
    "leakyrelu": "leakyrelu: approximate like relu (positively homogeneous)",
    "prelu": "prelu: approximate like relu (positively homogeneous per channel)",
    "clip": "clip/relu6: approximate; saturation breaks homogeneity (s*relu6(x) != relu6(s*x))",
    "sigmoid": "sigmoid: approximate (saturating; neither homogeneous nor linear)",
}


def _analyse(model: onnx.ModelProto) -> _Analysis:
    view = GraphView(model)
    ctx = Context(view, ChannelShapes(model))
    roles = {node.name: classify(node, ctx) for node in model.graph.node}
    analysis = _Analysis(view, ctx, roles, _UnionFind(), order={n.name: i for i, n in enumerate(model.graph.node)})
    uf = analysis.classes
    for node in model.graph.node:
        role = roles[node.name]
        if role.kind == "link":
            uf.union(node.input[role.data_inputs[0]], node.output[0])
        elif role.kind == "couple":
            inputs = [node.input[i] for i in role.data_inputs]
            if len({uf.find(i) for i in inputs}) == 1:
                analysis.gates.add(node.name)  # x * f(x): an elementwise nonlinearity, not a coupling
            for name in inputs:
                uf.union(inputs[0], name)
            uf.union(inputs[0], node.output[0])
    for node in model.graph.node:
        if roles[node.name].kind == "couple" and node.name not in analysis.gates:
            analysis.couplers.setdefault(uf.find(node.output[0]), []).append(node.name)
    return analysis


def _label(kinds: set[str]) -> str:
    order = ["residual", "depthwise", "concat", "flatten", "branch"]
    found = [k for k in order if k in kinds]
    return "+".join(found) or "chain"


def find_units(model: onnx.ModelProto, *, prune_residual: bool = False) -> tuple[list[PruneUnit], list[Skip]]:
    """Channel groups of a BN-folded model, in topological order, and the layers left alone.

    Parameters
    ----------
    model : onnx.ModelProto
        Output of :func:`udfc_onnx.fold.fold_batchnorm` (a BN left unfolded is a group member).
    prune_residual : bool, default=False
        Prune each residual stream as one group over all its producers and consumers. By default
        only convs inside residual blocks are pruned, as the paper does.

    Returns
    -------
    units : list of PruneUnit
    skipped : list of Skip
        One entry for every Conv/Gemm that produces no group, and for every depthwise conv
        whose channels belong to a group left alone.
    """
    a = _analyse(model)
    view, roles, uf = a.view, a.roles, a.classes
    order = {node.name: i for i, node in enumerate(model.graph.node)}

    producers: dict[str, list[onnx.NodeProto]] = {}
    foreign: dict[str, list[str]] = {}
    for node in model.graph.node:
        role = roles[node.name]
        if role.kind in ("link", "couple"):
            continue
        out = node.output[0] if node.output else ""
        if not out:
            continue
        cls = uf.find(out)
        if role.kind == "layer" and role.produces:
            producers.setdefault(cls, []).append(node)
        elif role.kind == "layer":
            foreign.setdefault(cls, []).append(f"{node.name} ({role.produce_reason})")
        else:
            foreign.setdefault(cls, []).append(f"{node.op_type} {node.name}")
    for inp in model.graph.input:
        if inp.name not in view.initializers:
            foreign.setdefault(uf.find(inp.name), []).append(f"graph input '{inp.name}'")

    units: list[PruneUnit] = []
    skipped: list[Skip] = []
    grouped: set[str] = set()
    left_alone_depthwise: dict[str, str] = {}

    for cls, prods in sorted(producers.items(), key=lambda kv: order[kv[1][0].name]):
        names = [p.name for p in prods]
        reason = ""
        if cls in foreign:
            reason = f"output channels are joined (by {', '.join(a.couplers.get(cls, ['an elementwise op']))}) " \
                     f"with channels of {', '.join(foreign[cls][:3])}, which cannot be pruned"
        elif len(prods) > 1 and not prune_residual:
            adds = ", ".join(a.couplers.get(cls, [])[:3])
            reason = (f"output feeds a residual stream (joined by {adds}) shared with {len(prods) - 1} other "
                      f"producer(s): coupled channels; left alone (--prune-residual prunes the stream as one group)")
        counts = {a.channels(p.output[0]) for p in prods}
        if not reason and (len(counts) != 1 or None in counts):
            reason = "producers of one channel group disagree on the channel count"
        try:
            if reason:
                raise _Fail(reason)
            consumers, members = a.trace(prods)
            if not consumers:
                raise _Fail("output reaches no Conv or Gemm that could absorb the pruning")
        except _Fail as exc:
            for p in prods:
                skipped.append(Skip(p.name, str(exc)))
            for name in _depthwise_after(a, prods):
                left_alone_depthwise.setdefault(name, f"depthwise conv: its channels follow {prods[0].name}, "
                                                      f"which is left alone ({exc})")
            continue
        units.append(_make_unit(a, prods, consumers, members, counts.pop()))
        grouped.update(names)

    in_group = {m.node for u in units for m in u.members}
    for node in model.graph.node:
        role = roles[node.name]
        if node.op_type not in ("Conv", "Gemm") or node.name in grouped:
            continue
        if role.kind == "layer" and not role.produces:
            skipped.append(Skip(node.name, role.produce_reason))
        elif role.kind == "block":
            skipped.append(Skip(node.name, role.reason))
        elif role.kind == "link" and node.name not in in_group:
            skipped.append(Skip(node.name, left_alone_depthwise.get(
                node.name, "depthwise conv: its input channels come from no prunable group")))
    skipped.sort(key=lambda s: order.get(s.node, 0))
    return units, skipped


def _depthwise_after(a: _Analysis, prods: list[onnx.NodeProto]) -> list[str]:
    cls = a.classes.find(prods[0].output[0])
    return [n for n, r in a.roles.items() if r.kind == "link" and r.effect == DEPTHWISE
            and a.classes.find(a.view.nodes_by_name[n].output[0]) == cls]


def _make_unit(a: _Analysis, prods: list[onnx.NodeProto], consumers: dict, members: dict, channels: int) -> PruneUnit:
    several = len(prods) > 1
    producer = prods[0].name
    slices, kinds, path_nodes = [], set(), []
    for (name, _), (node, role, offset, block, path) in sorted(consumers.items(),
                                                                key=lambda kv: (a.order[kv[0][0]], kv[0][1])):
        info = a.describe_path(producer, path, several)
        taps = _tap_fractions(node, a.ctx.shapes) if role.layer_kind == "conv" else ()
        slices.append(ConsumerSlice(name, role.layer_kind, block, offset, path, **info, taps=taps))
        for step in path:
            op = a.view.nodes_by_name[step].op_type
            if op == "Concat":
                kinds.add("concat")
            elif op in ("Flatten", "Reshape"):
                kinds.add("flatten")
            if step not in path_nodes:
                path_nodes.append(step)
    member_list = []
    for (name, offset), (node, role, off, block) in sorted(members.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        if role.kind == "flatten":  # a hard-coded Reshape target: rewritten, not sliced
            member_list.append(ChannelMember(name, "Reshape", (node.input[1],), (0,), off, block))
            continue
        arrays = tuple(node.input[p.input_index] for p in role.params)
        axes = tuple(p.axis for p in role.params)
        eps = float(attribute(node, "epsilon", 1e-5)) if node.op_type == "BatchNormalization" else 0.0
        if role.effect == DEPTHWISE:
            kinds.add("depthwise")
        member_list.append(ChannelMember(name, node.op_type, arrays, axes, off // block, block, eps))
    if several:
        kinds.add("residual")
    if len(slices) > 1:
        kinds.add("branch")
    effects = [a.roles[n].effect if a.roles[n].kind == "link" else
               (NONLINEAR if n in a.gates else IDENTITY) for n in path_nodes]
    linear = all(e in (IDENTITY, LINEAR, AFFINE) for e in effects)
    activation = "none"
    for n in path_nodes:
        role = a.roles[n]
        if role.kind == "link" and role.effect == NONLINEAR:
            activation = role.activation.kind if role.activation else "nonlinear"
            break
        if n in a.gates:
            activation = "gate"
            break
    modes = {c.compensation for c in slices}
    compensation = modes.pop() if len(modes) == 1 else "mixed"
    notes = tuple(dict.fromkeys(c.note for c in slices if c.note))
    return PruneUnit(producer, channels, tuple(path_nodes), tuple(slices), activation, linear,
                     tuple(p.name for p in prods) if several else (), tuple(member_list), _label(kinds),
                     compensation, notes)


def _tap_fractions(node: onnx.NodeProto, shapes: ChannelShapes) -> tuple[float, ...]:
    """Per kernel tap, the fraction of output positions where it reads the map and not padding."""
    dims = shapes.dims.get(node.input[0])
    weight = shapes.dims.get(node.input[1])
    if not dims or not weight or len(dims) != 4 or len(weight) != 4 or None in dims[2:]:
        return ()
    kernel = list(weight[2:])
    strides = list(attribute(node, "strides", [1, 1]))
    dilations = list(attribute(node, "dilations", [1, 1]))
    pads = list(attribute(node, "pads", [0, 0, 0, 0]))
    auto_pad = attribute(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    fractions = []
    for axis in range(2):
        size, k, s, d = dims[2 + axis], kernel[axis], strides[axis], dilations[axis]
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            out = -(-size // s)
            total = max((out - 1) * s + d * (k - 1) + 1 - size, 0)
            begin = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
        elif auto_pad == "VALID":
            out, begin = (size - d * (k - 1) - 1) // s + 1, 0
        else:
            begin, end = pads[axis], pads[axis + 2]
            out = (size + begin + end - d * (k - 1) - 1) // s + 1
        if out < 1:
            return ()
        rows = np.arange(out) * s - begin
        fractions.append(np.array([np.mean((rows + u * d >= 0) & (rows + u * d < size)) for u in range(k)]))
    taps = np.outer(fractions[0], fractions[1]).ravel()
    return () if np.all(taps == 1.0) else tuple(float(t) for t in taps)


def raw_filters_of(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Weights of every Conv and Gemm with a constant weight, output channels first (before BN folding).

    Channel ranking and Neuron Merging look at these raw filters.
    """
    view = GraphView(model)
    out = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2 or not view.is_constant(node.input[1]):
            continue
        w = view.array(node.input[1])
        if node.op_type == "Gemm" and w.ndim == 2 and not attribute(node, "transB", 0):
            w = w.T
        out[node.name] = w
    return out


class RawFilterReader(Mapping):
    """:func:`raw_filters_of` read on demand, one weight at a time, instead of a copy of every weight
    (the arrays may be read-only).

    Valid while the model's Conv/Gemm weight initializers hold their unfolded values (the model
    given to ``fold_batchnorm(..., weights_out=...)``); the graph is indexed at the first access.
    """

    def __init__(self, model: onnx.ModelProto):
        self._model = model
        self._view: GraphView | None = None
        self._nodes: dict[str, onnx.NodeProto] = {}

    def _index(self) -> dict[str, onnx.NodeProto]:
        if self._view is None:
            self._view = GraphView(self._model)
            self._nodes = {node.name: node for node in self._model.graph.node
                           if node.op_type in ("Conv", "Gemm") and len(node.input) >= 2
                           and self._view.is_constant(node.input[1])}
        return self._nodes

    def __getitem__(self, name: str) -> np.ndarray:
        node = self._index()[name]
        w = self._view.array(node.input[1], copy=False)  # read only (ranking, moments, NM)
        return w.T if node.op_type == "Gemm" and w.ndim == 2 and not attribute(node, "transB", 0) else w

    def __contains__(self, name) -> bool:  # Mapping's would read the weight to find out
        return name in self._index()

    def __iter__(self):
        return iter(self._index())

    def __len__(self) -> int:
        return len(self._index())


def member_arrays(model: onnx.ModelProto, units: list[PruneUnit]) -> dict[str, np.ndarray]:
    """Initializers of every group member (BN parameters, slopes, depthwise filters, reshape targets)."""
    view = GraphView(model)
    return {name: view.array(name) for u in units for m in u.members for name in m.arrays}


def limit_to_statistics(units: list[PruneUnit], stats: dict) -> list[PruneUnit]:
    """Downgrade compensation where the BN statistics it needs do not exist.

    The mean transfer needs the pre-activation statistics of the pruned channels (a BN). Without
    them (a model exported with BN folded, a bias-only Conv/Gemm), regressing pruned filters on
    kept ones through a nonlinearity leaves the constant ``E[A_j] - sum_i c_ij E[A_i]`` uncorrected,
    which measured worse than plain pruning (spec section 9, and every BN-free builder model), so
    such a consumer is pruned without compensation. Linear paths keep the regression (exact in
    the linear regime).

    Parameters
    ----------
    units : list of PruneUnit
    stats : dict of str to BNStats
        From :func:`udfc_onnx.stats.read_bn_stats`, keyed by the layer a BN follows.
    """
    out = []
    for unit in units:
        bn_members = {m.node for m in unit.members if m.op == "BatchNormalization"}
        changed = []
        for c in unit.consumers:
            st = stats.get(c.stats_from) if c.stats_from else None
            available = c.stats_from in bn_members or (st is not None and st.bn_node not in bn_members)
            if available or c.compensation == "none":
                changed.append(c)
            elif c.compensation == "mean":
                note = c.note + "; no BN statistics for the mean either: pruned without compensation"
                changed.append(replace(c, compensation="none", stats_from="", note=note))
            elif c.nonlinear:
                why = ("no BN statistics for the pruned channels' mean, and without that correction the regression "
                       "through a nonlinearity measured worse than plain pruning: pruned without compensation")
                changed.append(replace(c, compensation="none", stats_from="", note=why))
            else:
                changed.append(replace(c, stats_from=""))
        if changed != list(unit.consumers):
            modes = {c.compensation for c in changed}
            notes = tuple(dict.fromkeys(c.note for c in changed if c.note))
            unit = replace(unit, consumers=tuple(changed), compensation=modes.pop() if len(modes) == 1 else "mixed",
                           notes=notes)
        out.append(unit)
    return out
