"""nnU-Net v2 model folders in, the same format out, and PSP-Seg trained inside nnU-Net.

::

    read_model_folder(FOLDER, folds)    -> NNUNetModel: plans, dataset.json, per fold the teacher (nnU-Net-built,
                                           weights read weights-only), the base spec (JSON) of the network
    calibration_images(model, IMAGES)   -> float32 (C, z, y, x) arrays through nnU-Net's own preprocessing
                                           (raw case_0000.nii.gz files, or an nnUNet_preprocessed folder)
    write_model_folder(OUT, model, networks, report=...)
                                        -> a model folder stock nnUNetv2_predict_from_modelfolder runs:
                                           plans naming SlimNNUNet, plain checkpoints, manifest.json
    predict_folder(FOLDER, IMAGES, OUT) -> segmentations by nnU-Net's predictor (weights read weights-only)
    nnUNetTrainerPSP                    -> nnU-Net trainer of PSP-Seg with FD loss and progressive pruning
                                           (prunekit3d.sources.nnunet.trainer; nnUNet_extTrainer=EXT_TRAINER_DIR)

Needs the ``nnunet`` extra (README set-up). Importing this package does not import nnU-Net; the functions do.
"""

from pathlib import Path

from prunekit3d.sources.nnunet.checkpoint import Checkpoint, read_checkpoint, write_checkpoint
from prunekit3d.sources.nnunet.folder import MANIFEST_FORMAT, NNUNetFold, NNUNetModel, read_model_folder
from prunekit3d.sources.nnunet.network import SlimNNUNet
from prunekit3d.sources.nnunet.predict import predict_folder
from prunekit3d.sources.nnunet.preprocess import calibration_images
from prunekit3d.sources.nnunet.write import write_model_folder

#: The folder to put into ``nnUNet_extTrainer`` so that ``nnUNetv2_train -tr nnUNetTrainerPSP`` finds the trainer.
EXT_TRAINER_DIR = str(Path(__file__).parent / "ext_trainers")

__all__ = [
    "EXT_TRAINER_DIR",
    "MANIFEST_FORMAT",
    "Checkpoint",
    "NNUNetFold",
    "NNUNetModel",
    "SlimNNUNet",
    "calibration_images",
    "predict_folder",
    "read_checkpoint",
    "read_model_folder",
    "write_checkpoint",
    "write_model_folder",
]
