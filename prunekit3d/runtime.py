"""CPU inference: route small 3-D convolutions to oneDNN, where PyTorch would not.

For a batch-1 ``float32`` input, PyTorch's CPU backend picks oneDNN for a 3x3x3 ``Conv3d`` only when
``N * C * D * H > 20480``; below that it runs ``slow_conv3d`` (im2col and a GEMM). The layers of small
and of channel-pruned 3-D U-Nets are mostly below that line, which is why their latency falls far less
than their FLOPs. Measured by ``benchmarks/onednn.py`` (2 CPU cores): one 3x3x3 conv below the line
runs 2-12x faster at 8-32 channels on 16^3-32^3 inputs and 1.3x at 128 channels on 4^3; whole networks
gain 1.2-1.9x (PSP-Seg S at 64^3, the demo DynUNet and its compressed version at 64x64x32), large ones
nothing (they already run on oneDNN).

:func:`use_onednn` changes no weight and no result beyond float rounding (1e-4): the convolutions keep
their parameters and state-dict names, and fall back to PyTorch's own path wherever the oneDNN call
would not be the same function -- with autograd on (training), on other devices or dtypes, while
tracing or exporting (TorchScript and ONNX see a plain ``Conv3d``), and for padding modes other than
zeros.

    >>> net = prunekit3d.use_onednn(prunekit3d.load("compressed").eval())
    >>> with torch.no_grad():
    ...     y = net(x)
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["OneDNNConv3d", "use_onednn"]


class OneDNNConv3d(nn.Conv3d):
    """``nn.Conv3d`` whose no-grad CPU ``float32`` forward calls oneDNN directly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            torch.is_grad_enabled()
            or x.device.type != "cpu"
            or x.dtype != torch.float32
            or self.padding_mode != "zeros"
            or isinstance(self.padding, str)
            or torch.jit.is_tracing()
            or torch.jit.is_scripting()
            or torch.onnx.is_in_onnx_export()
            or torch.compiler.is_compiling()
            or torch.compiler.is_exporting()
        ):
            return super().forward(x)
        return torch.mkldnn_convolution(
            x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups
        )


def use_onednn(model: nn.Module) -> nn.Module:
    """Make every plain ``nn.Conv3d`` of ``model`` a :class:`OneDNNConv3d`, in place; returns ``model``.

    Only the class changes (parameters, buffers, names and hooks stay), so saving, loading and copying
    are unaffected. Without oneDNN in this PyTorch build, the model is returned unchanged.
    """
    if not torch.backends.mkldnn.is_available():
        return model
    for module in model.modules():
        if type(module) is nn.Conv3d:
            module.__class__ = OneDNNConv3d
    return model
