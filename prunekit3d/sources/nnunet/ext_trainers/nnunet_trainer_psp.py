"""What ``nnUNet_extTrainer`` points at: nnU-Net imports every module of this folder to find ``-tr NAME``."""

from prunekit3d.sources.nnunet.trainer import nnUNetTrainerPSP

__all__ = ["nnUNetTrainerPSP"]
