"""prunekit3d: make 3-D medical segmentation networks small and fast without losing accuracy.

The data flow reads as the package layout::

    wrap  ->  train / distil (fd)  ->  calibrate  ->  prune / restore  ->  slim  ->  io (save/load), report
"""

from prunekit3d.redundant import ParallelRedundantModule, RedundantModule, SequentialRedundantModule
from prunekit3d.wrap import WrapSpec, find_blocks, redundant_modules, wrap, wrap_spec

__version__ = "0.1.0"

__all__ = [
    "ParallelRedundantModule",
    "RedundantModule",
    "SequentialRedundantModule",
    "WrapSpec",
    "__version__",
    "find_blocks",
    "redundant_modules",
    "wrap",
    "wrap_spec",
]
