"""Scoring channels per unit of what they cost, so that global pruning spends a budget where it is paid.

A group of coupled channels (torch-pruning's ``Group``) costs, per channel, the multiply-adds (or parameters)
of every layer in it divided by that layer's channels along the pruned dimension: a channel of a full-
resolution convolution costs the voxels of the whole image, one of the bottleneck an eighth or less of it.
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

from prunekit3d.report import count_flops
from prunekit3d.wrap import unwrap

__all__ = ["COSTS", "CostAwareImportance", "layer_costs"]

#: What a channel can cost.
COSTS = ("flops", "params")

_OUT = {function.prune_conv_out_channels, function.prune_linear_out_channels}
_IN = {function.prune_conv_in_channels, function.prune_linear_in_channels}


def layer_costs(model: nn.Module, example_input: torch.Tensor, cost: str = "flops") -> dict[nn.Module, float]:
    """Multiply-adds (one forward on ``example_input``) or parameters of every convolution and linear layer."""
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {list(COSTS)}, got {cost!r}")
    net = unwrap(model)
    layers = {name: m for name, m in net.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))}
    if cost == "params":
        return {m: float(sum(p.numel() for p in m.parameters(recurse=False))) for m in layers.values()}
    flops = count_flops(net, example_input).by_module
    return {m: float(flops.get(name, 0)) for name, m in layers.items()}


class CostAwareImportance:
    """A channel importance divided by the cost of one channel of its group (see the module docstring).

    Args:
        base: any torch-pruning group importance, ``callable(group) -> per-channel scores``.
        model, example_input: the network to be pruned and one input; the costs are read off them now.
        cost: "flops" (multiply-adds of one forward) or "params".
        alpha: how strongly cost counts (1: importance per unit of cost; 0: the base importance alone).
    """

    def __init__(self, base: Callable[[tp.Group], torch.Tensor | None], model: nn.Module,
                 example_input: torch.Tensor, cost: str = "flops", alpha: float = 1.0) -> None:
        self.base, self.alpha = base, float(alpha)
        self.costs = layer_costs(model, example_input, cost)

    def group_cost(self, group: tp.Group) -> float:
        """What removing one channel of ``group`` saves (at least 1, so that free groups rank by importance)."""
        total = 0.0
        for dep, _ in group:
            layer, fn = dep.layer, dep.pruning_fn
            if layer not in self.costs:
                continue
            if fn in _OUT:
                width = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
            elif fn in _IN:
                width = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
            else:
                continue
            total += self.costs[layer] / max(1, width)
        return max(total, 1.0)

    def __call__(self, group: tp.Group) -> torch.Tensor | None:
        scores = self.base(group)
        if scores is None or self.alpha == 0:
            return scores
        return scores / self.group_cost(group) ** self.alpha
