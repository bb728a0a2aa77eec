"""Mechanism: torch-pruning's dependency graph, built so that it follows 3-D U-Nets and redundant modules.

torch-pruning (1.6) traces a network through autograd: a forward hook records, for every layer it can
prune, the ``grad_fn`` of the layer's output, and the graph is read back from the outputs' ``grad_fn``
chains. With torch 2.13 that tracing loses layers that the U-Nets here use; the channel count of a
skip tensor then cannot be inferred, and building the graph of a concatenation U-Net crashes in
``update_concat_index_mapping`` (``int + NoneType``). Three causes, three fixes from the outside:

1. **Instance norm output rewritten in place.** ``F.instance_norm`` returns a *view* of a
   ``batch_norm`` output. An in-place activation after it (``LeakyReLU(inplace=True)`` in nnU-Net,
   DynUNet, BasicUNet, the light branches) makes autograd replace the view's ``grad_fn`` with a new
   ``AsStridedBackward`` node, so the ``ViewBackward`` that the hook recorded is no longer on the graph:
   the norm (and with it the in-place activation) is invisible; its affine parameters would not be
   pruned, and channel inference walks into ``NativeBatchNormBackward``, whose last input is the
   ``repeat`` of the norm weight, which has no channel count.
   Fix: while tracing, a forward hook that runs *before* torch-pruning's hook (``prepend=True``)
   replaces any layer output that is a view by a copy. In-place ops then rewrite the copy's
   ``grad_fn`` into a successor of the recorded node, which stays on the graph.
2. **PReLU with one shared parameter** (MONAI's default): torch-pruning's pruner reports no channel
   count for it, and its second autograd input is the reshaped weight, so inference again ends at a
   parameter. Fix: :class:`SharedPReLUPruner`, registered through torch-pruning's
   ``customized_pruners``, reports the channel count recorded in the tracing forward.
3. **Layers used functionally.** A parallel redundant module concatenates its light branches' 1x1
   weights and calls ``F.conv3d`` (torch-pruning would take it for an element-wise op and couple the
   block's channels with the hidden ones), and light branches run their norms functionally (their
   affine parameters would never be pruned). Fix: the tracing forward runs in
   :func:`prunekit3d.tracing.tracing` mode, in which light branches, redundant modules and slim blocks
   call every layer as a module (their ``traceable_forward``): every branch of a redundant module
   (masked ones too, so that a restored branch still fits), gates detached (a gate is one scalar per
   branch, never a channel). The traced graph couples each branch's hidden channels
   (reduce -> norm -> conv) and ties the block's channels to its residual path and its original block,
   which keeps them consistent.

Beside these, :class:`GroupNormPruner` keeps ``num_groups`` right for ``nn.GroupNorm(C, C)``, the
instance norm of slim blocks (torch-pruning's own group-norm pruner never changes ``num_groups``).

All of this is scoped to one tracing forward (:func:`build_graph`'s ``forward_fn``, torch-pruning's
documented hook for custom forwards) and undone afterwards: the hooks registered here are removed by
their handles, the modes reset; no forward is replaced and torch-pruning itself is not patched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning import ops
from torch_pruning.pruner.function import BasePruningFunc

from prunekit3d.modes import kept_modes
from prunekit3d.redundant import RedundantModule
from prunekit3d.slim.blocks import GatedBlock, SlimParallel
from prunekit3d.tracing import tracing
from prunekit3d.wrap import unwrap

__all__ = [
    "GroupNormPruner",
    "SharedPReLUPruner",
    "build_graph",
    "channel_groups",
    "gate_parameters",
    "output_layers",
    "prunable_groups",
    "sync_splits",
    "sync_widths",
    "traceable_forward",
]

ROOT_TYPES = (ops.TORCH_CONV, ops.TORCH_LINEAR)


class SharedPReLUPruner(BasePruningFunc):
    """PReLU pruner that knows the channels of a PReLU with one shared parameter.

    A shared-parameter PReLU has nothing to prune, but torch-pruning needs its channel count to
    infer the sizes of the tensors concatenated after it. The counts come from the tracing forward
    (:func:`traceable_forward` fills :attr:`channels`) and follow every pruning step.
    """

    TARGET_MODULES = nn.PReLU

    def __init__(self) -> None:
        super().__init__(pruning_dim=1)
        self.channels: dict[nn.PReLU, int] = {}

    def prune_out_channels(self, layer: nn.PReLU, idxs: Sequence[int]) -> nn.PReLU:
        if layer.num_parameters == 1:
            if layer in self.channels:
                self.channels[layer] -= len(idxs)
            return layer
        keep = sorted(set(range(layer.num_parameters)) - set(idxs))
        layer.num_parameters = len(keep)
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 0)
        return layer

    prune_in_channels = prune_out_channels  # one channel dimension: in and out are coupled

    def get_out_channels(self, layer: nn.PReLU) -> int | None:
        return layer.num_parameters if layer.num_parameters > 1 else self.channels.get(layer)

    get_in_channels = get_out_channels


class GroupNormPruner(tp.pruner.function.GroupNormPruner):
    """torch-pruning's group-norm pruner, also right for one group per channel (an instance norm).

    ``nn.GroupNorm(C, C)`` (what slim blocks use as a faster instance norm) has no channel blocks to
    keep equal: removing channels removes their groups, so ``num_groups`` follows ``num_channels``.
    Other group norms keep their groups, and the same positions leave every group.
    """

    def prune_out_channels(self, layer: nn.GroupNorm, idxs: Sequence[int]) -> nn.GroupNorm:
        per_channel = layer.num_groups == layer.num_channels
        super().prune_out_channels(layer, idxs)
        if per_channel:
            layer.num_groups = layer.num_channels
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channel_groups(self, layer: nn.GroupNorm) -> int:
        return 1 if layer.num_groups == layer.num_channels else layer.num_groups

    get_in_channel_groups = get_out_channel_groups


def _copy_views(module: nn.Module, args: tuple, output: object) -> object:
    # Runs before torch-pruning's hook, which then records the copy's grad_fn (fix 1 above).
    if isinstance(output, torch.Tensor) and output._is_view():
        return output.clone()
    return None


def _rng_devices(model: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


@contextlib.contextmanager
def traceable_forward(model: nn.Module, prelu: SharedPReLUPruner | None = None) -> Iterator[nn.Module]:
    """Within the block, ``model``'s forward is one that torch-pruning can trace (see module docstring).

    The model runs in training mode, so that training-only outputs (DynUNet's deep-supervision heads)
    are traced too, and in :func:`prunekit3d.tracing.tracing` mode; on exit its modes, buffers (norm
    running statistics), hooks and the random number generators (dropout) are as before.
    """

    def count_channels(module: nn.PReLU, args: tuple) -> None:
        prelu.channels[module] = args[0].shape[1]  # type: ignore[union-attr]

    modes = {m: m.training for m in model.modules()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    handles = []
    try:
        with torch.random.fork_rng(devices=_rng_devices(model)), tracing(model):
            for m in model.modules():
                handles.append(m.register_forward_hook(_copy_views, prepend=True))
                if prelu is not None and isinstance(m, nn.PReLU) and m.num_parameters == 1:
                    handles.append(m.register_forward_pre_hook(count_channels))
            model.train()
            yield model
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
        for m, training in modes.items():
            m.train(training)


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The gates of redundant modules and gated blocks: scalars per branch, never channels."""
    gates = []
    for m in model.modules():
        if isinstance(m, RedundantModule):
            gates.append(m.gates)
        elif isinstance(m, GatedBlock):
            gates.append(m.gate)
    return gates


def build_graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    """torch-pruning's dependency graph of ``model`` with the fixes of this module's docstring.

    The model's training mode, buffers and outputs are unchanged afterwards.
    """
    model = unwrap(model)
    prelu = SharedPReLUPruner()

    def forward_fn(m: nn.Module, x: torch.Tensor) -> object:
        with traceable_forward(m, prelu):
            return m(x)

    try:
        # kept_modes: torch-pruning leaves the model in eval mode
        with kept_modes(model), torch.enable_grad(), _all_parameters_traced(model):
            graph = tp.DependencyGraph().build_dependency(
                model,
                example_inputs=example_input,
                forward_fn=forward_fn,
                customized_pruners={nn.PReLU: prelu, nn.GroupNorm: GroupNormPruner()},
                ignored_params=gate_parameters(model),
                verbose=False,
            )
    finally:
        _detach_kept_tensors(model)
    sync_splits(graph)
    return graph


@contextlib.contextmanager
def _all_parameters_traced(model: nn.Module) -> Iterator[None]:
    """Tracing follows autograd: a frozen layer fed by frozen layers would leave no node on the graph."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


def _detach_kept_tensors(model: nn.Module) -> None:
    """Detach tensors that modules keep as plain attributes from the tracing forward.

    MONAI's DynUNet stores its deep-supervision outputs in a list attribute; still attached to the
    trace's autograd graph, they would make the model refuse ``copy.deepcopy`` (and so slim and save).
    """
    for m in model.modules():
        for name, value in vars(m).items():
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                setattr(m, name, value.detach())
            elif isinstance(value, list):
                value[:] = [v.detach() if isinstance(v, torch.Tensor) else v for v in value]


def output_layers(graph: tp.DependencyGraph) -> list[nn.Module]:
    """The layers whose output channels are the network's outputs (heads): they are never pruned.

    Starts at every output of the traced forward and walks back through parameter-free ops
    (additions, concatenations, upsampling, the stacking of deep-supervision outputs) to the first
    layers that hold channels.
    """
    def holds_channels(node: tp.Node) -> bool:
        return isinstance(node.module, nn.Module) and graph.get_out_channels(node.module) is not None

    # An output is a node nothing reads: torch-pruning's output op, or a layer whose result is returned as is.
    stack = [n for n in graph.module2node.values() if not n.outputs]
    found: dict[nn.Module, None] = {}
    seen = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if holds_channels(node):
            found[node.module] = None
        else:
            stack.extend(node.inputs)
    return list(found)


def channel_groups(graph: tp.DependencyGraph, group: tp.Group) -> int:
    """Into how many equal blocks the group's channels are split (group norms, grouped convs), else 1.

    Pruning then removes the same positions from every block, so that each stays divisible.
    """
    sizes = [1]
    for dep, _ in group:
        layer = dep.target.module
        depthwise = isinstance(layer, ops.TORCH_CONV) and layer.groups == layer.out_channels
        if not isinstance(layer, nn.Module) or depthwise:  # depthwise convs follow their channels one to one
            continue
        pruner = graph.get_pruner_of_module(layer)
        if pruner is None:
            continue
        out = graph.is_out_channel_pruning_fn(dep.handler)
        sizes.append(pruner.get_out_channel_groups(layer) if out else pruner.get_in_channel_groups(layer))
    return max(sizes)


def _branch_convs(model: nn.Module) -> dict[nn.Module, list[nn.Conv3d]]:
    """Fused reductions of slim blocks with several light branches -> the branch convs they feed."""
    return {m.reduce: list(m.convs) for m in model.modules() if isinstance(m, SlimParallel) and len(m.convs) > 1}


def prunable_groups(
    graph: tp.DependencyGraph, ignored: Sequence[nn.Module] = ()
) -> Iterator[tuple[nn.Module, object, tp.Group]]:
    """``(root layer, pruning function, full group)`` for every set of coupled channels that may shrink.

    Groups come from torch-pruning's ``get_all_groups`` (rooted at conv / linear outputs), except the
    hidden channels of a slim block's fused 1x1 reduction: they are split between the branch convs, so
    they are offered branch by branch (rooted at each branch conv's input) -- a whole-reduction group
    could drop every channel of one branch.
    """
    fused = _branch_convs(graph.model)
    ignored_layers = [sub for m in ignored for sub in m.modules()]
    for group in graph.get_all_groups(ignored_layers=ignored_layers + list(fused), root_module_types=ROOT_TYPES):
        dep = group[0].dep
        yield dep.target.module, dep.handler, group
    for convs in fused.values():
        for conv in convs:
            if conv in graph.module2node and conv not in ignored_layers:
                fn = tp.prune_conv_in_channels
                yield conv, fn, graph.get_pruning_group(conv, fn, list(range(conv.in_channels)))


def sync_widths(model: nn.Module) -> None:
    """Bring width attributes that forwards rely on in line with the pruned layers.

    ``SlimParallel.hidden`` sizes the split of the fused hidden map. ``RedundantModule.channels`` is not
    touched: it is the width the module was *built* with, which the wrap spec records and ``load``
    rebuilds before replaying the channel record.
    """
    for m in unwrap(model).modules():
        if isinstance(m, SlimParallel):
            m.hidden = [conv.in_channels for conv in m.convs]


def sync_splits(graph: tp.DependencyGraph) -> None:
    """Keep the graph's record of each slim block's hidden split in line with its branch convs.

    torch-pruning reads a split's sizes once, when the graph is built, and maps channel indices
    through them ever after; a second pruning round on the same graph would then address channels
    the first round removed. The outputs are also put in branch order, which the offsets assume.
    """
    branch = {  # each branch conv of a multi-branch slim block -> its position in the block
        conv: i
        for m in unwrap(graph.model).modules()
        if isinstance(m, SlimParallel) and len(m.convs) > 1
        for i, conv in enumerate(m.convs)
    }
    for node in graph.module2node.values():
        if node.type != ops.OPTYPE.SPLIT or not node.outputs or any(o.module not in branch for o in node.outputs):
            continue
        node.outputs.sort(key=lambda o: branch[o.module])
        sizes = [o.module.in_channels for o in node.outputs]
        node.module.split_sizes = sizes
        node.module.offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]

