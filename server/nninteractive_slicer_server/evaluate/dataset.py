"""The cases of an evaluation: images and label maps on disk, paired by name.

Two layouts:

* an nnU-Net raw dataset folder (``imagesTr`` / ``labelsTr``, or ``imagesTs`` / ``labelsTs``): image files
  ``CASE_0000.nii.gz``, ``CASE_0001.nii.gz``, ... (one per channel) and ``CASE.nii.gz`` labels;
* two folders, images and labels, of files with the same names (``CASE.nrrd`` and ``CASE.nrrd``), or with the
  images' channel suffixes (``CASE_0000.nrrd``).

Every label value other than 0 is one object. Files are NIfTI, NRRD or MetaImage, read with SimpleITK (arrays
``[z, y, x]``, spacing in that order). Mistakes (a missing folder, a label without its image, a channel missing,
sizes that differ) raise ``DatasetError`` with a message that names the files and says what to do.
"""

import json
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..auto.io import IMAGE_SUFFIXES

CHANNEL_SUFFIX = re.compile(r"^(.*)_(\d{4})$")
SHOWN = 5  # names listed in a message before "..."


class DatasetError(ValueError):
    """The folders given do not make a dataset; the message says why and what to do."""


@dataclass(frozen=True)
class Case:
    name: str
    images: Tuple[str, ...]  # one file per channel, in channel order
    label: str


def _stem(filename: str) -> Optional[str]:
    lower = filename.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix) and len(filename) > len(suffix):
            return filename[:-len(suffix)]
    return None


def _listing(folder: str, what: str) -> Dict[str, str]:
    """``{stem: path}`` of the image files in ``folder``."""
    if not os.path.exists(folder):
        raise DatasetError("%s folder %s does not exist" % (what, folder))
    if not os.path.isdir(folder):
        raise DatasetError("%s %s is a file; give a folder of %s files" % (what, folder, _kinds()))
    found: Dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        stem = _stem(name)
        if stem is None or name.startswith(".") or not os.path.isfile(os.path.join(folder, name)):
            continue
        if stem in found:
            raise DatasetError("%s folder %s holds %s and %s: two files for one name; keep one"
                               % (what, folder, os.path.basename(found[stem]), name))
        found[stem] = os.path.join(folder, name)
    if not found:
        raise DatasetError("%s folder %s holds no %s files" % (what, folder, _kinds()))
    return found


def _kinds() -> str:
    return "/".join(IMAGE_SUFFIXES)


def name_list(names: Sequence[str]) -> str:
    names = sorted(names)
    return ", ".join(names[:SHOWN]) + (", ... (%d in all)" % len(names) if len(names) > SHOWN else "")


def raw_dataset_folders(folder: str, subset: Optional[str] = None) -> Tuple[str, str]:
    """``(images, labels)`` folders of an nnU-Net raw dataset: ``subset`` ``Tr`` or ``Ts``; by default ``Ts`` when it
    has labels, else ``Tr``."""
    if not os.path.isdir(folder):
        raise DatasetError("IMAGES folder %s does not exist" % folder if not os.path.exists(folder)
                           else "IMAGES %s is a file; give a folder" % folder)
    choices = [subset] if subset else ["Ts", "Tr"]
    for s in choices:
        images, labels = os.path.join(folder, "images" + s), os.path.join(folder, "labels" + s)
        if os.path.isdir(images) and os.path.isdir(labels):
            return images, labels
    if subset:
        raise DatasetError("%s has no images%s/labels%s folders; choose the subset it has (--subset Tr or Ts)"
                           % (folder, subset, subset))
    raise DatasetError("%s is not an nnU-Net raw dataset folder (it has no imagesTr/labelsTr or imagesTs/labelsTs); "
                       "give LABELS too: a folder of label files named like the images" % folder)


def find_cases(images: str, labels: Optional[str] = None, subset: Optional[str] = None) -> List[Case]:
    """The cases of a dataset, sorted by name (``labels`` None: ``images`` is an nnU-Net raw dataset folder)."""
    dataset_json = None
    if labels is None:
        dataset_json = os.path.join(images, "dataset.json")
        images, labels = raw_dataset_folders(images, subset)
    image_files = _listing(images, "IMAGES")
    label_files = _listing(labels, "LABELS")
    if os.path.samefile(images, labels):
        raise DatasetError("IMAGES and LABELS are the same folder (%s); give the folder of label maps as LABELS"
                           % images)
    single: Dict[str, str] = {}  # CASE.ext beside label CASE.ext
    channels: Dict[str, Dict[int, str]] = {}  # CASE_0000.ext, CASE_0001.ext, ... beside label CASE.ext
    unmatched = []
    for stem, path in image_files.items():
        m = CHANNEL_SUFFIX.match(stem)
        if stem in label_files:
            if m and m.group(1) in label_files:
                raise DatasetError("%s could be case %s or channel %s of case %s; rename one of them"
                                   % (os.path.basename(path), stem, m.group(2), m.group(1)))
            single[stem] = path
        elif m and m.group(1) in label_files:
            channels.setdefault(m.group(1), {})[int(m.group(2))] = path
        else:
            unmatched.append(os.path.basename(path))
    both = sorted(set(single) & set(channels))
    if both:
        raise DatasetError("case %s has an image %s and channel files %s; keep one form"
                           % (both[0], os.path.basename(single[both[0]]),
                              os.path.basename(next(iter(channels[both[0]].values())))))
    channels.update({stem: {0: path} for stem, path in single.items()})
    if unmatched:
        raise DatasetError("no label in %s for the images %s; each image needs a label file of the same name (for "
                           "channel files CASE_0000: a label CASE), or move those images out"
                           % (labels, name_list(unmatched)))
    missing = [os.path.basename(p) for s, p in label_files.items() if s not in channels]
    if missing:
        raise DatasetError("no image in %s for the labels %s; each label needs an image of the same name (or CASE_0000 "
                           "for channel files)" % (images, name_list(missing)))
    cases = []
    for name in sorted(channels):
        found = channels[name]
        if sorted(found) != list(range(len(found))):
            raise DatasetError("case %s has the channels %s; channel files must be numbered _0000, _0001, ... "
                               "without a gap" % (name, ", ".join("_%04d" % c for c in sorted(found))))
        cases.append(Case(name, tuple(found[c] for c in sorted(found)), label_files[name]))
    counts = {len(c.images) for c in cases}
    if len(counts) > 1:
        raise DatasetError("the cases have different numbers of channels (%s); every case needs the same channels"
                           % ", ".join(str(n) for n in sorted(counts)))
    if dataset_json and os.path.isfile(dataset_json):
        try:
            with open(dataset_json) as f:
                declared = len(json.load(f).get("channel_names", {})) or None
        except (OSError, ValueError, AttributeError) as exc:
            raise DatasetError("%s cannot be read: %s" % (dataset_json, exc))
        if declared is not None and declared != len(cases[0].images):
            raise DatasetError("%s declares %d channel(s) but the cases have %d" % (dataset_json, declared,
                                                                                   len(cases[0].images)))
    return cases


def _read(path: str):
    from ..auto.io import read_image, to_array
    from ..validate import BadInput

    try:
        image = read_image(path).image
    except BadInput as exc:
        raise DatasetError(str(exc))
    array, spacing = to_array(image)
    return image, array, spacing


def load_labels(case: Case) -> Tuple[np.ndarray, List[float]]:
    """The label map ``[z, y, x]`` (integers) and its spacing in mm."""
    _, labels, spacing = _read(case.label)
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or not np.array_equal(labels, np.round(labels)):
            raise DatasetError("the label map %s holds values that are not whole numbers; labels must be integers "
                               "(0 background, 1, 2, ... one object each)" % case.label)
        labels = labels.astype(np.int64)
    elif labels.dtype.kind not in "biu":
        raise DatasetError("the label map %s has voxels of type %s; labels must be integers"
                           % (case.label, labels.dtype))
    return labels, spacing


def load_image(case: Case, shape: Sequence[int]) -> np.ndarray:
    """The image ``[channels, z, y, x]``; every channel must have the label map's ``shape``."""
    arrays = []
    for path in case.images:
        _, array, _ = _read(path)
        if tuple(array.shape) != tuple(shape):
            raise DatasetError("case %s: the image %s has %s voxels ([z, y, x]) but its label map %s has %s; images "
                               "and labels must be on the same grid" % (case.name, path, list(array.shape), case.label,
                                                                        list(shape)))
        if array.dtype == np.float64:
            array = array.astype(np.float32)  # half the bytes to send; nnInteractive computes in float32
        arrays.append(array)
    return np.stack(arrays) if len(arrays) > 1 else arrays[0][None]


def objects(labels: np.ndarray, only: Optional[Sequence[int]] = None) -> List[int]:
    """The label values present (0 excluded), or those of ``only`` that are present."""
    present = [int(v) for v in np.unique(labels) if v != 0]
    return present if only is None else [v for v in present if v in set(only)]
