"""Build tiny nnInteractive checkpoint folders that the real library loads and runs on a CPU.

The folder layout is what ``nnInteractiveInferenceSession.initialize_from_trained_model_folder``
expects (plans.json, dataset.json, inference_info.json, LICENSE, fold_0/checkpoint_final.pth).
A random network predicts nothing meaningful; it exists to exercise every code path (server,
client, wire) quickly. For meaningful masks use the trained model in ``Testing/models/blobs``.

Usage: python Testing/models/tiny_models.py OUT_DIR [--features 4 8 16] [--patch 64 64 64] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional, Sequence

CONFIGURATION = "3d_tiny"
IMAGE_CHANNELS = 1
# The library adds its interaction channels (prev_seg + 3 positive/negative pairs) to the image channels.
INTERACTION_CHANNELS = 7
TRAINER_NAME = "nnInteractiveTrainer_stub"  # a known name keeps nnU-Net's trainer tree (torchvision) unimported


def architecture(features: Sequence[int], n_conv: int = 1) -> dict:
    n_stages = len(features)
    return {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": n_stages,
            "features_per_stage": list(features),
            "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[3, 3, 3]] * n_stages,
            "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n_stages - 1),
            "n_conv_per_stage": [n_conv] * n_stages,
            "n_conv_per_stage_decoder": [n_conv] * (n_stages - 1),
            "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def resenc_architecture(features: Sequence[int], n_blocks: Sequence[int]) -> dict:
    """nnU-Net's ResidualEncoderUNet (the family of nnInteractive's official model); same keys as ``architecture``."""
    arch = architecture(features)
    kw = arch["arch_kwargs"]
    arch["network_class_name"] = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    kw["n_blocks_per_stage"] = list(n_blocks)
    del kw["n_conv_per_stage"]
    return arch


# nnU-Net ResEnc-L, the size of nnInteractive's official network: 6 stages, 32-320 features, patch 192^3.
RESENC_L_FEATURES = (32, 64, 128, 256, 320, 320)
RESENC_L_BLOCKS = (1, 3, 4, 6, 6, 6)
RESENC_L_PATCH = (192, 192, 192)


def plans(patch_size: Sequence[int], arch: dict) -> dict:
    return {
        "dataset_name": "Dataset999_TinyBlobs",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
        "original_median_shape_after_transp": list(patch_size),
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            CONFIGURATION: {
                "data_identifier": "nnUNetPlans_3d_tiny",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": list(patch_size),
                "median_image_size_in_voxels": list(patch_size),
                "spacing": [1.0, 1.0, 1.0],
                "normalization_schemes": ["ZScoreNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
                "architecture": arch,
                "batch_dice": True,
            }
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {"max": 1.0, "mean": 0.0, "median": 0.0, "min": 0.0, "percentile_00_5": 0.0,
                  "percentile_99_5": 1.0, "std": 1.0}
        },
    }


def build_network(patch_size: Sequence[int], features: Sequence[int], n_conv: int = 1, arch: Optional[dict] = None):
    """The network the library will rebuild from plans.json (so weights always fit); ``arch`` defaults to
    ``architecture(features, n_conv)``."""
    import importlib

    arch = arch or architecture(features, n_conv)
    kw = dict(arch["arch_kwargs"])
    for key in arch["_kw_requires_import"]:
        if kw.get(key) is not None:
            module, _, name = kw[key].rpartition(".")
            kw[key] = getattr(importlib.import_module(module), name)
    module, _, name = arch["network_class_name"].rpartition(".")
    network_class = getattr(importlib.import_module(module), name)
    return network_class(input_channels=IMAGE_CHANNELS + INTERACTION_CHANNELS, num_classes=2,
                         deep_supervision=False, **kw)


def write_model_folder(out_dir: str, state_dict: dict, patch_size: Sequence[int], features: Sequence[int],
                       n_conv: int = 1, license_text: str = "Apache-2.0",
                       inference_info: Optional[dict] = None, arch: Optional[dict] = None) -> str:
    import torch

    os.makedirs(os.path.join(out_dir, "fold_0"), exist_ok=True)
    with open(os.path.join(out_dir, "plans.json"), "w") as f:
        json.dump(plans(patch_size, arch or architecture(features, n_conv)), f, indent=1)
    with open(os.path.join(out_dir, "dataset.json"), "w") as f:
        json.dump({"channel_names": {"0": "image"}, "labels": {"background": 0, "object": 1},
                   "numTraining": 0, "file_ending": ".nii.gz"}, f, indent=1)
    with open(os.path.join(out_dir, "inference_info.json"), "w") as f:
        json.dump(inference_info or {}, f, indent=1)
    with open(os.path.join(out_dir, "LICENSE"), "w") as f:
        f.write(license_text + "\n")
    torch.save({"network_weights": state_dict, "trainer_name": TRAINER_NAME,
                "init_args": {"configuration": CONFIGURATION}},
               os.path.join(out_dir, "fold_0", "checkpoint_final.pth"))
    return out_dir


def make_random_model(out_dir: str, features: Sequence[int] = (4, 8, 16), patch_size: Sequence[int] = (64, 64, 64),
                      seed: int = 0, background_bias: Optional[float] = 2.0) -> str:
    """A random network. With ``background_bias`` its last layer is scaled down and biased to background, so it
    predicts (almost) nothing and never triggers autozoom while still running every code path of the library.
    With ``background_bias=None`` it predicts speckled, input-dependent masks: a good oracle for comparing two
    ways of running the same prompts voxel for voxel (run it with autozoom off)."""
    import torch

    torch.manual_seed(seed)
    net = build_network(patch_size, features)
    seg = net.decoder.seg_layers[-1]
    if background_bias is not None:
        with torch.no_grad():
            seg.weight.mul_(0.01)
            seg.bias.copy_(torch.tensor([background_bias, -background_bias]))
    return write_model_folder(out_dir, net.state_dict(), patch_size, features)


def make_random_resenc_l(out_dir: str, seed: int = 0, background_bias: Optional[float] = 2.0) -> str:
    """A random network of the official model's size (ResEnc-L, ~100 M parameters, patch 192^3), for timing on a
    GPU. Biased to background by default (like ``make_random_model``) so it never triggers autozoom."""
    import torch

    torch.manual_seed(seed)
    arch = resenc_architecture(RESENC_L_FEATURES, RESENC_L_BLOCKS)
    net = build_network(RESENC_L_PATCH, RESENC_L_FEATURES, arch=arch)
    if background_bias is not None:
        seg = net.decoder.seg_layers[-1]
        with torch.no_grad():
            seg.weight.mul_(0.01)
            seg.bias.copy_(torch.tensor([background_bias, -background_bias]))
    return write_model_folder(out_dir, net.state_dict(), RESENC_L_PATCH, RESENC_L_FEATURES, arch=arch)


def cpu_session(model_dir: str, do_autozoom: bool = False, threads: Optional[int] = None):
    """The real library's ``nnInteractiveInferenceSession`` on the CPU for a model folder, its start-up output
    silenced; ``threads`` defaults to torch's current setting."""
    import contextlib
    import io

    import torch
    from nnInteractive.inference.inference_session import nnInteractiveInferenceSession

    with contextlib.redirect_stdout(io.StringIO()):
        s = nnInteractiveInferenceSession(device=torch.device("cpu"), use_torch_compile=False, verbose=False,
                                          do_autozoom=do_autozoom, torch_n_threads=threads or torch.get_num_threads())
        s.initialize_from_trained_model_folder(model_dir)
    return s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--features", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--patch", type=int, nargs=3, default=[64, 64, 64])
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(make_random_model(a.out_dir, a.features, a.patch, a.seed))


if __name__ == "__main__":
    main()
