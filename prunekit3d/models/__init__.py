"""Reference networks, built by name through a small registry.

>>> from prunekit3d.models import create_model, psp_seg
>>> model = psp_seg("S", in_channels=1, out_channels=3)            # PSP-Seg-S, deep supervision on
>>> same = create_model("psp_seg_s", in_channels=1, out_channels=3)
"""

from prunekit3d.models import nnunet as _nnunet  # noqa: F401  (registers "nnunet_network")
from prunekit3d.models.pspseg import VARIANTS, PSPSeg, PSPSegConfig, psp_seg
from prunekit3d.models.registry import create_model, list_models, register_model

__all__ = ["PSPSeg", "PSPSegConfig", "VARIANTS", "create_model", "list_models", "psp_seg", "register_model"]
