"""Sources: the formats a trained network comes in, read safely (never unpickling code), and written back.

- :mod:`~prunekit3d.sources.state_dict`: a prunekit3d artifact, or a state dict (``.pt``/``.pth``/
  ``.safetensors``) plus the network's spec.
- :mod:`~prunekit3d.sources.bundle`: a MONAI bundle (network_def, weights, preprocessing, inferer), and the
  compressed network written back as a bundle.
- :mod:`~prunekit3d.sources.nnunet`: nnU-Net v2 model folders (``<Trainer>__<Plans>__<configuration>``),
  their preprocessing and predictor, the folder written back, and the PSP-Seg trainer for nnU-Net.
"""

from prunekit3d.sources.state_dict import build_model, check_3d, first_conv, fit_weights, model_spec, read_state_dict

__all__ = ["build_model", "check_3d", "first_conv", "fit_weights", "model_spec", "read_state_dict"]
