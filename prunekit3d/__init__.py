"""prunekit3d: make 3-D medical segmentation networks small and fast without losing accuracy.

The data flow reads as the package layout::

    wrap  ->  train / distil (fd, schedule)  ->  calibrate  ->  prune / restore  ->  slim  ->  io (save / load)

>>> import prunekit3d as pk
>>> net = pk.wrap(net, example_input)                 # unified start: same function, redundant blocks
>>> plan = pk.calibrate(net, batches, step=1)         # which branches can each block do without?
>>> pk.prune(net, plan)                               # mask them (pk.restore(net, plan) undoes it)
>>> small = pk.slim(net)                              # physically smaller plain module
>>> pk.save(net, "artifact/"); again = pk.load("artifact/")
"""

__version__ = "0.1.0"

from prunekit3d.calibrate import GateMagnitude, ReconstructionError, calibrate
from prunekit3d.channels import ChannelPlan, ChannelRecord, channel_record, prune_channels
from prunekit3d.export import check_onnx, export_onnx, export_torchscript
from prunekit3d.fd import FDFeatures, FDLoss, find_fd_features, foreground_percentile
from prunekit3d.io import ArtifactError, from_spec, load, load_manifest, save
from prunekit3d.plan import ModuleDecision, PrunePlan
from prunekit3d.prune import active_branches, prune, restore
from prunekit3d.redundant import ParallelRedundantModule, RedundantModule, SequentialRedundantModule
from prunekit3d.runtime import use_onednn
from prunekit3d.schedule import Decision, ProgressivePruner
from prunekit3d.slim import set_active_branches, slim
from prunekit3d.wrap import WrapSpec, find_blocks, redundant_modules, wrap, wrap_spec

__all__ = [
    "ArtifactError",
    "ChannelPlan",
    "ChannelRecord",
    "Decision",
    "FDFeatures",
    "FDLoss",
    "ProgressivePruner",
    "channel_record",
    "check_onnx",
    "export_onnx",
    "export_torchscript",
    "set_active_branches",
    "find_fd_features",
    "foreground_percentile",
    "prune_channels",
    "GateMagnitude",
    "ModuleDecision",
    "ParallelRedundantModule",
    "PrunePlan",
    "ReconstructionError",
    "RedundantModule",
    "SequentialRedundantModule",
    "WrapSpec",
    "__version__",
    "active_branches",
    "calibrate",
    "find_blocks",
    "from_spec",
    "load",
    "load_manifest",
    "prune",
    "redundant_modules",
    "restore",
    "save",
    "slim",
    "use_onednn",
    "wrap",
    "wrap_spec",
]
