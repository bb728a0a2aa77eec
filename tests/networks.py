"""Small but real 3-D segmentation networks shared by the tests (MONAI and nnU-Net's library).

Each factory returns ``(model, example_input)`` with widths kept small so that the suite runs on
two CPU cores; the architectures are the libraries' own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def monai_unet() -> tuple[nn.Module, torch.Tensor]:
    from monai.networks.nets import UNet

    return UNet(3, 1, 3, (8, 16, 32, 64), (2, 2, 2), num_res_units=2), torch.randn(1, 1, 32, 32, 32)


def dynunet() -> tuple[nn.Module, torch.Tensor]:
    from monai.networks.nets import DynUNet

    net = DynUNet(3, 1, 3, [3, 3, 3, 3], [1, 2, 2, 2], [2, 2, 2], filters=[8, 16, 32, 64], res_block=True)
    return net, torch.randn(1, 1, 32, 32, 32)


def segresnet() -> tuple[nn.Module, torch.Tensor]:
    from monai.networks.nets import SegResNet

    return SegResNet(3, init_filters=8, in_channels=1, out_channels=3), torch.randn(1, 1, 32, 32, 32)


def basic_unet() -> tuple[nn.Module, torch.Tensor]:
    from monai.networks.nets import BasicUNet

    return BasicUNet(3, 1, 3, features=(8, 8, 16, 32, 64, 8)), torch.randn(1, 1, 32, 32, 32)


def swin_unetr() -> tuple[nn.Module, torch.Tensor]:
    from monai.networks.nets import SwinUNETR

    net = SwinUNETR(in_channels=1, out_channels=3, feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
    return net, torch.randn(1, 1, 64, 64, 64)  # 32^3 leaves a 1^3 bottleneck, which instance norm refuses


def _nnunet_kwargs() -> dict:
    return dict(
        conv_op=nn.Conv3d,
        kernel_sizes=3,
        strides=(1, 2, 2, 2),
        num_classes=3,
        conv_bias=True,
        norm_op=nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
    )


def plain_conv_unet() -> tuple[nn.Module, torch.Tensor]:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    net = PlainConvUNet(1, 4, (8, 16, 32, 64), n_conv_per_stage=2, n_conv_per_stage_decoder=2, **_nnunet_kwargs())
    return net, torch.randn(1, 1, 32, 32, 32)


def residual_encoder_unet() -> tuple[nn.Module, torch.Tensor]:
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

    net = ResidualEncoderUNet(
        1, 4, (8, 16, 32, 64), n_blocks_per_stage=(1, 2, 2, 2), n_conv_per_stage_decoder=(1, 1, 1), **_nnunet_kwargs()
    )
    return net, torch.randn(1, 1, 32, 32, 32)


#: name -> factory, for parametrised tests.
NETWORKS: dict[str, Callable[[], tuple[nn.Module, torch.Tensor]]] = {
    "monai_unet": monai_unet,
    "dynunet": dynunet,
    "segresnet": segresnet,
    "basic_unet": basic_unet,
    "swin_unetr": swin_unetr,
    "plain_conv_unet": plain_conv_unet,
    "residual_encoder_unet": residual_encoder_unet,
}


def first_output(y: torch.Tensor | list | tuple) -> torch.Tensor:
    """The full-resolution output of a network that may return deep-supervision lists."""
    return y[0] if isinstance(y, (list, tuple)) else y
