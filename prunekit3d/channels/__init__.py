"""Channel pruning through torch-pruning's dependency graph, for 3-D U-Nets and redundant modules.

- :mod:`~prunekit3d.channels.graph`: mechanism -- the dependency graph, made to follow U-Nets and
  redundant / slim modules; heads; groups of coupled channels.
- :mod:`~prunekit3d.channels.importance`: criteria -- which channels of a group matter least.
- :mod:`~prunekit3d.channels.prune`: policy -- :func:`prune_channels` to a ratio or a budget.
- :mod:`~prunekit3d.channels.record`: the channel record that rebuilds a pruned model at load.
"""

from prunekit3d.channels.graph import build_graph, output_layers
from prunekit3d.channels.importance import IMPORTANCES
from prunekit3d.channels.prune import count_flops, count_params, kernel_widths, prune_channels
from prunekit3d.channels.record import (
    STAGES,
    ChannelPlan,
    ChannelRecord,
    apply_channel_plan,
    apply_channel_record,
    channel_record,
)

__all__ = [
    "IMPORTANCES",
    "STAGES",
    "ChannelPlan",
    "ChannelRecord",
    "apply_channel_plan",
    "apply_channel_record",
    "build_graph",
    "channel_record",
    "count_flops",
    "count_params",
    "kernel_widths",
    "output_layers",
    "prune_channels",
]
