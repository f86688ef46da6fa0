"""Tiny, deterministic nnU-Net v2 results folders in TotalSegmentator's layout (test helper).

TotalSegmentator finds a model at
``<weights dir>/Dataset<ID>_<name>/<trainer>__<plans>__<configuration>/`` with ``plans.json``,
``dataset.json`` and ``fold_0/checkpoint_final.pth`` (see ``totalsegmentator.map_tasks_config``
and ``nnunetv2.inference.predict_from_raw_data.nnUNetPredictor.initialize_from_trained_model_folder``).
This module writes such folders with a 2-stage ``PlainConvUNet`` whose weights are set by hand
so that its output is a known function of the input image, in the frame the network sees (the
canonical RAS image TotalSegmentator writes, read by nnU-Net's ``SimpleITKIO`` as ``(z, y, x)``):

* HU in [150, 1800)  -> ``vertebrae_L1`` (31);  [1800, 2600) -> ``heart`` (51);  >= 2600 -> ``aorta`` (52);
* a rise of more than 2000 HU across two voxels along canonical +x (towards the patient's
  right) -> ``lung_upper_lobe_left`` (10); a fall of more than 2000 HU -> ``lung_upper_lobe_right`` (12).

So a bright block gets ``..._left`` on its face on the patient's left and ``..._right`` on its
face on the patient's right: a left/right error anywhere between our adapter and the network
swaps them. The checkpoint is written by the test itself with ``torch.save``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TRAINER_FAST = "nnUNetTrainer_4000epochs_NoMirroring"  # TotalSegmentator's trainer for 297 and 298
PLANS = "nnUNetPlans"
CONFIGURATION = "3d_fullres"

SPINE_TS, HEART_TS, AORTA_TS, LEFT_TS, RIGHT_TS = 31, 51, 52, 10, 12
EDGE_HU = 2000.0  # gradient threshold of the left/right classes
OFFSET = 2000.0  # u = HU + OFFSET stays positive through the LeakyReLUs


def _total_labels() -> dict[str, int]:
    from totalsegmentator.map_to_binary import class_map

    labels = {"background": 0}
    labels.update({name: value for value, name in sorted(class_map["total"].items())})
    return labels


def _plans(dataset_name: str, spacing: float, patch: int) -> dict:
    arch = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": 2,
            "features_per_stage": [4, 8],
            "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[3, 3, 3], [3, 3, 3]],
            "strides": [[1, 1, 1], [2, 2, 2]],
            "n_conv_per_stage": [1, 1],
            "n_conv_per_stage_decoder": [1],
            "conv_bias": True,
            "norm_op": None,
            "norm_op_kwargs": None,
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    config = {
        "data_identifier": f"{PLANS}_{CONFIGURATION}",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": [patch, patch, patch],
        "median_image_size_in_voxels": [100, 100, 100],
        "spacing": [spacing, spacing, spacing],
        "normalization_schemes": ["CTNormalization"],
        "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": arch,
        "batch_dice": False,
    }
    return {
        "dataset_name": dataset_name,
        "plans_name": PLANS,
        "original_median_spacing_after_transp": [spacing] * 3,
        "original_median_shape_after_transp": [100, 100, 100],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {CONFIGURATION: config},
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        # CTNormalization: clip to [-1024, 3071] HU, then (HU - 0) / 1: the network sees HU
        "foreground_intensity_properties_per_channel": {
            "0": {"max": 3071.0, "mean": 0.0, "median": 0.0, "min": -1024.0,
                  "percentile_00_5": -1024.0, "percentile_99_5": 3071.0, "std": 1.0}
        },
    }


def _network(plans: dict, n_classes: int, *, with_edges: bool, bands: bool):
    """The PlainConvUNet of ``plans`` with hand-set weights (see the module docstring)."""
    import torch

    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    arch = plans["configurations"][CONFIGURATION]["architecture"]
    net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                 1, n_classes, allow_init=True, deep_supervision=False)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        enc = net.encoder.stages[0][0].convs[0].conv  # 1 -> 4 channels, 3x3x3
        enc.weight[0, 0, 1, 1, 1] = 1.0  # ch0 = HU + OFFSET
        enc.bias[0] = OFFSET
        if with_edges:  # network axes (z, y, x); x = canonical +x
            enc.weight[1, 0, 1, 1, 2], enc.weight[1, 0, 1, 1, 0] = 1.0, -1.0  # ch1 = relu(rise - EDGE)
            enc.bias[1] = -EDGE_HU
            enc.weight[2, 0, 1, 1, 2], enc.weight[2, 0, 1, 1, 0] = -1.0, 1.0  # ch2 = relu(fall - EDGE)
            enc.bias[2] = -EDGE_HU
        dec = net.decoder.stages[0].convs[0].conv  # input: 4 upsampled + 4 skip channels
        for c in range(3):
            dec.weight[c, 4 + c, 1, 1, 1] = 1.0  # pass the skip channels through, ignore the coarse path
        seg = net.decoder.seg_layers[-1]
        seg.bias.fill_(-1000.0)
        seg.bias[0] = 0.0  # background: logit 0
        u0 = OFFSET
        if bands:  # upper envelope of lines in u: slopes 0 < a < b < c -> consecutive HU bands
            a, b, c = 0.01, 0.02, 0.04
            seg.weight[SPINE_TS, 0], seg.bias[SPINE_TS] = a, -a * (u0 + 150)
            seg.weight[HEART_TS, 0], seg.bias[HEART_TS] = b, -b * (u0 + 1800) + a * 1650
            seg.weight[AORTA_TS, 0], seg.bias[AORTA_TS] = c, -c * (u0 + 2600) + b * 800 + a * 1650
        else:  # only HU >= 2600 -> aorta
            seg.weight[AORTA_TS, 0], seg.bias[AORTA_TS] = 0.04, -0.04 * (u0 + 2600)
        if with_edges:
            seg.weight[LEFT_TS, 1], seg.bias[LEFT_TS] = 1.0, -10.0
            seg.weight[RIGHT_TS, 2], seg.bias[RIGHT_TS] = 1.0, -10.0
    return net.eval()


def model_folder(weights_dir: Path, task_id: int, trainer: str = TRAINER_FAST) -> Path:
    """``<weights dir>/<Dataset folder>/<trainer>__nnUNetPlans__3d_fullres`` of a TotalSegmentator task."""
    from totalsegmentator.map_tasks_config import TASK_ID_WEIGHTS_CONFIGS

    info = TASK_ID_WEIGHTS_CONFIGS[task_id]
    return Path(weights_dir) / (info.get("rel_path") or "") / info["foldername"] / f"{trainer}__{PLANS}__{CONFIGURATION}"


def write_fake_task(weights_dir: Path, task_id: int, *, spacing: float, patch: int, with_edges: bool, bands: bool,
                    trainer: str = TRAINER_FAST) -> Path:
    """Write one results folder (plans.json, dataset.json, fold_0/checkpoint_final.pth); returns it."""
    import torch

    folder = model_folder(weights_dir, task_id, trainer)
    dataset_name = folder.parent.name
    labels = _total_labels()
    dataset_json = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1, "file_ending": ".nii.gz",
                    "name": dataset_name}
    plans = _plans(dataset_name, spacing, patch)
    net = _network(plans, len(labels), with_edges=with_edges, bands=bands)
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    checkpoint = {
        "network_weights": net.state_dict(),
        "optimizer_state": None,
        "grad_scaler_state": None,
        "logging": {},
        "_best_ema": None,
        "current_epoch": 1,
        "init_args": {"plans": plans, "configuration": CONFIGURATION, "fold": 0, "dataset_json": dataset_json,
                      "device": "cpu"},
        "trainer_name": trainer,
        "inference_allowed_mirroring_axes": None,
    }
    torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
    return folder


def write_fake_total_fast(weights_dir: Path) -> Path:
    """Tasks 297 (3 mm, bands + left/right edges) and 298 (6 mm crop model: only HU >= 2600 -> aorta)."""
    write_fake_task(weights_dir, 297, spacing=3.0, patch=64, with_edges=True, bands=True)
    write_fake_task(weights_dir, 298, spacing=6.0, patch=32, with_edges=False, bands=False)
    return Path(weights_dir)


def expected_bands(hu: np.ndarray) -> np.ndarray:
    """The TotalSegmentator class the fake 297 model gives each HU value, ignoring edges."""
    out = np.zeros(hu.shape, np.uint8)
    out[(hu >= 150) & (hu < 1800)] = SPINE_TS
    out[(hu >= 1800) & (hu < 2600)] = HEART_TS
    out[hu >= 2600] = AORTA_TS
    return out
