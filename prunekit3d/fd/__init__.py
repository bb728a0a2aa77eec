"""Functional decoupling (FD): make the encoder describe the foreground only, for any 3-D U-Net.

Two losses, from one extra encoder-only pass on a masked copy of the input::

    x ---------------------- model(x) (your training forward) --+-- encoder features e_i (with gradients)
                                                                 +-- decoder feature d at 1/2 resolution
    x_masked = x where label > 0, else mask_value
      \\-- no_grad, encoder only (stops at the bottleneck) ------- encoder features m_i (constants)

    L_fd  = sum_i mean(1 - cos_channels(e_i, m_i))             over every encoder level and the bottleneck
    L_aux = BCE_with_logits(mean_channels(d), foreground at d's resolution)

Use in any training loop (plain, MONAI engine, nnU-Net ``train_step``) in this order::

    fd = FDLoss(model, example_input, mask_value=foreground_percentile(training_pairs)[0])
    for x, label in loader:
        logits = model(x)                 # 1. the normal forward: hooks keep e_i and d
        l_fd, l_aux = fd(x, label)        # 2. the masked pass and both losses
        loss = seg_loss(logits, label) + 0.1 * (l_fd + l_aux)
        loss.backward()
    fd.close()                            # or: with FDLoss(...) as fd:

Build ``FDLoss`` after :func:`prunekit3d.wrap` (and again after anything that replaces modules, like
slimming): its hooks sit on the module objects it found. Masking branches (prune/restore) is fine.

Which features: :func:`find_fd_features` traces one forward and reads the resolution profile of the
module outputs (see its docstring); pass ``encoder=[names]`` and ``decoder_half=name`` to choose.

Modules: :mod:`~prunekit3d.fd.features` (which features FD compares), :mod:`~prunekit3d.fd.mask_value` (the
background value of the masked input), :mod:`~prunekit3d.fd.loss` (the two losses).
"""

from prunekit3d.fd.features import FDFeatures, find_fd_features
from prunekit3d.fd.loss import FDLoss
from prunekit3d.fd.mask_value import foreground_percentile

__all__ = ["FDFeatures", "FDLoss", "find_fd_features", "foreground_percentile"]
