"""Scoring channels per unit of what they cost, so that global pruning spends a budget where it is paid.

A group of coupled channels (torch-pruning's ``Group``) costs, per channel, the multiply-adds (or parameters)
of every layer in it divided by that layer's channels along the pruned dimension: a channel of a full-
resolution convolution costs the voxels of the whole image, one of the bottleneck an eighth or less of it.
For latency the cost is the activations: the values a channel makes each layer read (an input channel) or
write (an output channel). On a CPU a 3-D U-Net's time follows its activations more than its multiply-adds
(``benchmarks/conv_width.py``: half the channels of a full-resolution layer, a quarter of its multiply-adds,
half its time), so full-resolution channels cost eight times a channel one level down, not four.
:class:`CostAwareImportance` divides any importance by that cost, so that ranking all channels together
(``prune_channels(..., global_pruning=True)``) removes first the channels that give the most of the budget
back for the least importance -- the high-resolution layers when the budget is FLOPs or latency, the deep,
wide ones when it is parameters::

    score(channel) = importance(channel) / cost(group) ** alpha        (alpha = 0: plain global ranking)

>>> import torch_pruning as tp
>>> scorer = CostAwareImportance(tp.importance.GroupMagnitudeImportance(), model, example, cost="flops")
>>> prune_channels(model, example, ratio=0.4, importance=scorer, global_pruning=True)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.pruner import function

from prunekit3d.modes import kept_modes
from prunekit3d.report import count_flops
from prunekit3d.wrap import unwrap

__all__ = ["COSTS", "CostAwareImportance", "layer_costs"]

#: What a channel can cost.
COSTS = ("flops", "params", "activations")

_OUT = {function.prune_conv_out_channels, function.prune_linear_out_channels}
_IN = {function.prune_conv_in_channels, function.prune_linear_in_channels}


def layer_costs(model: nn.Module, example_input: torch.Tensor, cost: str = "flops"
                ) -> dict[nn.Module, tuple[float, float]]:
    """What one output and one input channel of every convolution and linear layer cost: multiply-adds (one
    forward on ``example_input``), parameters, or activations (the values per channel the layer writes / reads)."""
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {list(COSTS)}, got {cost!r}")
    net = unwrap(model)
    layers = {name: m for name, m in net.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))}
    if cost == "activations":
        return _activations(net, layers, example_input)
    if cost == "params":
        totals = {m: float(sum(p.numel() for p in m.parameters(recurse=False))) for m in layers.values()}
    else:
        flops = count_flops(net, example_input).by_module
        totals = {m: float(flops.get(name, 0)) for name, m in layers.items()}
    return {m: (total / max(1, _width(m, out=True)), total / max(1, _width(m, out=False))) for m, total in totals.items()}


def _width(layer: nn.Module, out: bool) -> int:
    if isinstance(layer, nn.Linear):
        return layer.out_features if out else layer.in_features
    return layer.out_channels if out else layer.in_channels


def _activations(net: nn.Module, layers: dict[str, nn.Module], example_input: torch.Tensor
                 ) -> dict[nn.Module, tuple[float, float]]:
    """Values per output / input channel of every layer, seen in one forward (a layer that forward skips: 0)."""
    seen: dict[nn.Module, tuple[float, float]] = {}

    def per_channel(t: torch.Tensor, channels: int) -> float:
        return t.numel() / t.shape[0] / max(1, channels)  # per sample

    def record(layer: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        seen[layer] = (per_channel(output, _width(layer, out=True)), per_channel(inputs[0], _width(layer, out=False)))

    hooks = [m.register_forward_hook(record) for m in layers.values()]
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    try:
        with kept_modes(net), torch.no_grad():
            net.eval()
            net(example_input.to(device))
    finally:
        for hook in hooks:
            hook.remove()
    return {m: seen.get(m, (0.0, 0.0)) for m in layers.values()}


class CostAwareImportance:
    """A channel importance divided by the cost of one channel of its group (see the module docstring).

    Args:
        base: any torch-pruning group importance, ``callable(group) -> per-channel scores``.
        model, example_input: the network to be pruned and one input; the costs are read off them now.
        cost: "flops" (multiply-adds of one forward), "params" or "activations" (values read and written: latency).
        alpha: how strongly cost counts (1: importance per unit of cost; 0: the base importance alone).
    """

    def __init__(self, base: Callable[[tp.Group], torch.Tensor | None], model: nn.Module,
                 example_input: torch.Tensor, cost: str = "flops", alpha: float = 1.0) -> None:
        self.base, self.alpha = base, float(alpha)
        self.costs = layer_costs(model, example_input, cost)

    def group_cost(self, group: tp.Group) -> float:
        """What removing one channel of ``group`` saves (at least 1, so that free groups rank by importance)."""
        total, known = 0.0, False
        for dep, _ in group:
            layer, fn = dep.layer, dep.pruning_fn
            known = known or layer in self.costs
            if layer in self.costs and (fn in _OUT or fn in _IN):
                total += self.costs[layer][0 if fn in _OUT else 1]
        if not known:  # a copy of the model has other modules: every group would cost 1, a plain global ranking
            raise ValueError("CostAwareImportance scores a group of layers it has no cost for: build it on the "
                             "network being pruned (not on a model it was copied from)")
        return max(total, 1.0)

    def __call__(self, group: tp.Group) -> torch.Tensor | None:
        scores = self.base(group)
        if scores is None or self.alpha == 0:
            return scores
        return scores / self.group_cost(group) ** self.alpha
