"""Build tiny nnU-Net v2 result folders (random weights) that ``nnUNetPredictor`` loads and runs on a CPU in a
fraction of a second, and registry files (``model-serve-spec.yaml``) that point at them.

Layout, as nnU-Net writes it after training::

    MODEL_FOLDER/Dataset998_TinyOrgans/nnUNetTrainer__nnUNetPlans__3d_fullres/
        plans.json  dataset.json  fold_0/checkpoint_final.pth

The checkpoint names the trainer ``nnUNetTrainer``: nnU-Net finds it in the first module it looks at, so its
trainer variants (some import torchvision, which does not import against the CPU torch here) stay unimported.
A random network predicts nothing meaningful: unscaled it predicts speckled, input-dependent labels (every label
appears on a 64^3 image), which is what tests of shapes, label subsets and probability thresholds need.

Usage: python Testing/models/tiny_nnunet.py MODEL_FOLDER [--spec SPEC.yaml] [--labels liver spleen] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional, Sequence

from tiny_models import architecture  # the same tiny PlainConvUNet (one convolution per stage)

CONFIGURATION = "3d_fullres"
TRAINER_NAME = "nnUNetTrainer"  # found in nnU-Net's first trainer module: its torchvision-importing variants stay out
PLANS_NAME = "nnUNetPlans"
DATASET_NAME = "Dataset998_TinyOrgans"
RESULT_SUBFOLDER = "%s__%s__%s" % (TRAINER_NAME, PLANS_NAME, CONFIGURATION)
DEFAULT_LABELS = ("liver", "spleen")
DEFAULT_FEATURES = (4, 8)  # two stages: ~0.3 s a 64^3 image on an idle CPU core pair
DEFAULT_PATCH = (64, 64, 64)


def plans(patch_size: Sequence[int], features: Sequence[int], spacing: Sequence[float], channels: int) -> dict:
    return {
        "dataset_name": DATASET_NAME,
        "plans_name": PLANS_NAME,
        "original_median_spacing_after_transp": list(spacing),
        "original_median_shape_after_transp": list(patch_size),
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            CONFIGURATION: {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": list(patch_size),
                "median_image_size_in_voxels": list(patch_size),
                "spacing": list(spacing),
                "normalization_schemes": ["ZScoreNormalization"] * channels,
                "use_mask_for_norm": [False] * channels,
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                       "force_separate_z": None},
                "architecture": architecture(features),
                "batch_dice": True,
            }
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            str(c): {"max": 1.0, "mean": 0.0, "median": 0.0, "min": 0.0, "percentile_00_5": 0.0,
                     "percentile_99_5": 1.0, "std": 1.0} for c in range(channels)
        },
    }


def build_network(features: Sequence[int], channels: int, n_classes: int):
    """The network nnU-Net rebuilds from plans.json (so the weights always fit)."""
    import importlib

    arch = architecture(features)
    kw = dict(arch["arch_kwargs"])
    for key in arch["_kw_requires_import"]:
        if kw.get(key) is not None:
            module, _, name = kw[key].rpartition(".")
            kw[key] = getattr(importlib.import_module(module), name)
    module, _, name = arch["network_class_name"].rpartition(".")
    return getattr(importlib.import_module(module), name)(input_channels=channels, num_classes=n_classes,
                                                           deep_supervision=False, **kw)


def make_tiny_nnunet(model_folder: str, labels: Sequence[str] = DEFAULT_LABELS, channels: Sequence[str] = ("CT",),
                     dataset_name: str = DATASET_NAME, features: Sequence[int] = DEFAULT_FEATURES,
                     patch_size: Sequence[int] = DEFAULT_PATCH, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                     folds: Sequence[int] = (0,), checkpoint_names: Sequence[str] = ("checkpoint_final.pth",),
                     seed: int = 0, license_text: Optional[str] = None) -> str:
    """Write a random-weight result folder under ``model_folder/dataset_name/`` and return its path (the folder
    holding plans.json, dataset.json and fold_N/)."""
    import torch

    out = os.path.join(model_folder, dataset_name, RESULT_SUBFOLDER)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "plans.json"), "w") as f:
        json.dump(dict(plans(patch_size, features, spacing, len(channels)), dataset_name=dataset_name), f, indent=1)
    dataset = {"channel_names": {str(i): c for i, c in enumerate(channels)},
               "labels": dict({"background": 0}, **{name: i + 1 for i, name in enumerate(labels)}),
               "numTraining": 0, "file_ending": ".nii.gz"}
    with open(os.path.join(out, "dataset.json"), "w") as f:
        json.dump(dataset, f, indent=1)
    if license_text is not None:
        with open(os.path.join(out, "LICENSE"), "w") as f:
            f.write(license_text + "\n")
    for i, fold in enumerate(folds):
        torch.manual_seed(seed + i)
        net = build_network(features, len(channels), len(labels) + 1)
        os.makedirs(os.path.join(out, "fold_%s" % fold), exist_ok=True)
        for name in checkpoint_names:
            torch.save({"network_weights": net.state_dict(), "trainer_name": TRAINER_NAME,
                        "init_args": {"configuration": CONFIGURATION},
                        "inference_allowed_mirroring_axes": (0, 1, 2)},
                       os.path.join(out, "fold_%s" % fold, name))
    return out


SCT_CODES = {"liver": "10200004", "spleen": "78961009"}


def dcmqi_template(labels: Sequence[str] = DEFAULT_LABELS, colors: Optional[Sequence[Sequence[int]]] = None,
                   algorithm_name: str = "TinyOrgans") -> dict:
    """A DCMQI segmentation template (what https://qiicr.org/dcmqi/#/seg writes) for ``labels`` 1..N, coded as
    SNOMED CT anatomical structures (liver and spleen with their SNOMED CT codes; other names get the code of
    "organ", 272625005)."""
    colors = colors or [(216, 101, 79), (157, 108, 162), (128, 174, 128), (241, 214, 145)]
    attrs = []
    for i, name in enumerate(labels):
        attrs.append({
            "labelID": i + 1,
            "SegmentDescription": name,
            "SegmentLabel": name,
            "SegmentAlgorithmType": "AUTOMATIC",
            "SegmentAlgorithmName": algorithm_name,
            "SegmentedPropertyCategoryCodeSequence": {"CodeValue": "123037004", "CodingSchemeDesignator": "SCT",
                                                      "CodeMeaning": "Anatomical Structure"},
            "SegmentedPropertyTypeCodeSequence": {"CodeValue": SCT_CODES.get(name, "272625005"),
                                                  "CodingSchemeDesignator": "SCT",
                                                  "CodeMeaning": name.capitalize()},
            "recommendedDisplayRGBValue": list(colors[i % len(colors)]),
        })
    return {"ContentCreatorName": "tests", "ClinicalTrialSeriesID": "Session1", "ClinicalTrialTimePointID": "1",
            "SeriesDescription": "Segmentation", "SeriesNumber": "300", "InstanceNumber": "1",
            "BodyPartExamined": "ABDOMEN", "segmentAttributes": [attrs], "ContentLabel": "SEGMENTATION",
            "ContentDescription": "Image segmentation", "ClinicalTrialCoordinatingCenterName": ""}


def write_spec(path: str, model_folder: str, models: Optional[Sequence[dict]] = None, **top) -> str:
    """Write a ``model-serve-spec.yaml`` at ``path``. ``models`` defaults to one entry for the tiny organs model
    (id ``tiny_organs``, alias ``tiny``, a DCMQI template written beside the spec, CPU-friendly default args)."""
    import yaml

    if models is None:
        meta = os.path.join(os.path.dirname(os.path.abspath(path)), "metadata", "tiny-organs.json")
        os.makedirs(os.path.dirname(meta), exist_ok=True)
        with open(meta, "w") as f:
            json.dump(dcmqi_template(), f, indent=1)
        models = [{"id": "tiny_organs", "rel_path": DATASET_NAME, "name": "Tiny organ segmentation (random weights)",
                   "aliases": ["tiny"], "metadata": {"path": "metadata/tiny-organs.json"}, "min_mem": 100,
                   "default_args": {"use_folds": [0], "tta": False, "checkpoint_name": "checkpoint_final.pth"}}]
    spec = dict(top, model_folder=str(model_folder), models=list(models))
    with open(path, "w") as f:
        yaml.safe_dump(spec, f, sort_keys=False)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_folder")
    p.add_argument("--spec", help="also write a model-serve-spec.yaml here")
    p.add_argument("--labels", nargs="+", default=list(DEFAULT_LABELS))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(make_tiny_nnunet(a.model_folder, a.labels, seed=a.seed))
    if a.spec:
        print(write_spec(a.spec, a.model_folder))


if __name__ == "__main__":
    main()
