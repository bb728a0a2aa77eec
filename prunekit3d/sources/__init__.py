"""Where a network comes from: the formats prunekit3d reads a trained model from and writes it back to.

- :mod:`prunekit3d.sources.nnunet`: nnU-Net v2 model folders (``<Trainer>__<Plans>__<configuration>``),
  their preprocessing and predictor, and the PSP-Seg trainer for nnU-Net.
"""
