"""DICOM outputs of an automatic segmentation: DICOM SEG with ``highdicom`` (BINARY for label maps, FRACTIONAL for
probability maps) and RTSTRUCT with ``rt-utils`` (optional: ``pip install "nninteractive-slicer-server[rtstruct]"``,
because rt-utils brings OpenCV).

Frames follow the source series: the label map is ``[k, j, i]`` on the series' grid and ``files[k]`` is the DICOM
file of slice ``k`` (``io.Series.files``), so each frame is written against its own source image; highdicom takes
every frame's position and orientation from that source image and checks the geometry.

Segments come from the registry (``Segment``: value, name, colour, coded terminology). A SEG holds the labels that
occur, numbered 1..n in label order (DICOM wants consecutive segment numbers), each with its name as the segment
label, its colour as the recommended display colour and its codes (category, type, type modifier, anatomic region
and its modifier); labels without codes get SNOMED CT "Tissue" / "Tissue", as Slicer does for new segments. The
label value in the model's output is kept as the segment's ``TrackingID`` (``label <value>``).
"""

import logging
import os
from typing import Any, Dict, Optional, Sequence

import numpy as np

log = logging.getLogger("nninteractive_slicer_server")

RTSTRUCT_EXTRA = 'pip install "nninteractive-slicer-server[rtstruct]"'
DEFAULT_CODE = {"CodeValue": "85756007", "CodingSchemeDesignator": "SCT", "CodeMeaning": "Tissue"}
# Meanings of common segmentation category codes (inline metadata gives only the number).
CATEGORY_MEANINGS = {"85756007": "Tissue", "91723000": "Anatomical Structure",
                     "123037004": "Anatomical Structure", "49755003": "Morphologically Altered Structure",
                     "260787004": "Physical object", "246464006": "Function", "272737002": "Body Substance"}


class RTStructUnavailable(RuntimeError):
    """rt-utils is not installed."""


def rtstruct_available():
    import importlib.util

    return importlib.util.find_spec("rt_utils") is not None


# ---------------------------------------------------------------------------------------------------------- codes

def _concept(code):
    from highdicom.sr import CodedConcept

    value, scheme = str(code["CodeValue"]), str(code.get("CodingSchemeDesignator") or "SCT")
    meaning = code.get("CodeMeaning") or CATEGORY_MEANINGS.get(value) or "Code %s" % value
    return CodedConcept(value, scheme, meaning)


def segment_description(number, segment, algorithm):
    """A highdicom ``SegmentDescription`` for registry ``segment`` as segment ``number``."""
    import highdicom as hd

    term = segment.terminology or {}
    category = term.get("category") or DEFAULT_CODE
    seg_type = term.get("type") or (DEFAULT_CODE if not term.get("category") else category)
    regions = [_concept(term["anatomic_region"])] if term.get("anatomic_region") else None
    r, g, b = (int(c) for c in segment.color)
    desc = hd.seg.SegmentDescription(
        segment_number=int(number), segment_label=str(segment.name)[:64],
        segmented_property_category=_concept(category), segmented_property_type=_concept(seg_type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
        tracking_uid=hd.UID(), tracking_id="label %d" % segment.value, anatomic_regions=regions,
        display_color=hd.color.CIELabColor.from_rgb(r, g, b))
    if term.get("type_modifier"):
        from pydicom.dataset import Dataset

        mod = _concept(term["type_modifier"])
        item = Dataset()
        item.update(mod)
        desc.SegmentedPropertyTypeModifierCodeSequence = [item]
    if regions and term.get("anatomic_region_modifier"):
        from pydicom.dataset import Dataset

        item = Dataset()
        item.update(_concept(term["anatomic_region_modifier"]))
        desc.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [item]
    if segment.description and segment.description != segment.name:
        desc.SegmentDescription = str(segment.description)[:64]
    return desc


def algorithm_identification(info):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return hd.AlgorithmIdentificationSequence(name=str(info.get("algorithm_name") or "nnU-Net")[:64],
                                              family=codes.cid7162.ArtificialIntelligence,
                                              version=str(info.get("algorithm_version") or "1.0")[:64])


# ---------------------------------------------------------------------------------------------------------- SEG

def _read_sources(files):
    import pydicom

    return [pydicom.dcmread(f) for f in files]


def _seg_common(sources, info, description_suffix=""):
    import highdicom as hd

    desc = str(info.get("series_description") or "Segmentation")
    return dict(source_images=sources, series_instance_uid=hd.UID(), sop_instance_uid=hd.UID(),
                series_number=int(info.get("series_number") or 300),
                instance_number=int(info.get("instance_number") or 1),
                manufacturer=str(info.get("manufacturer") or "SlicerNNInteractive"),
                manufacturer_model_name=str(info.get("manufacturer_model_name") or info.get("algorithm_name")
                                            or "nnU-Net")[:64],
                software_versions=str(info.get("software_versions") or info.get("algorithm_version") or "1.0"),
                device_serial_number=str(info.get("device_serial_number") or "1"),
                series_description=(desc + description_suffix)[:64], content_label="SEGMENTATION",
                content_creator_name=_person_name(info.get("content_creator_name")))


def _person_name(name):
    if not name:
        return None
    name = str(name)[:64]
    return name if "^" in name else name + "^"  # one component: the family name, said unambiguously


def _finish(seg, info, path):
    for key, attr in (("body_part_examined", "BodyPartExamined"),
                      ("clinical_trial_series_id", "ClinicalTrialSeriesID"),
                      ("clinical_trial_time_point_id", "ClinicalTrialTimePointID")):
        if info.get(key) not in (None, ""):
            setattr(seg, attr, str(info[key])[:64])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    seg.save_as(path)
    return path


def _labelled_series(labels, files):
    """The label values present in ``labels`` and the series' datasets it is checked against; ``([], None)``
    when the map is empty (nothing is read then)."""
    values = [int(v) for v in np.unique(labels) if v > 0]
    if not values:
        return values, None
    sources = _read_sources(files)
    _check_frames(labels, sources, "the label map")
    return values, sources


def _check_frames(array, sources, what):
    rows, cols = int(sources[0].Rows), int(sources[0].Columns)
    if tuple(array.shape[:3]) != (len(sources), rows, cols):
        raise ValueError("%s of shape %s does not match its DICOM series (%d slices of %d x %d)"
                         % (what, list(array.shape), len(sources), rows, cols))


def write_binary_seg(labels, files, segments, path, info=None):
    """Write the label map ``labels`` (``[k, j, i]`` on the series of ``files``) as a BINARY DICOM SEG at ``path``.
    ``segments``: the registry's ``Segment`` records (others get a name from their value). Returns the label values
    written, or None (and writes nothing) when the map is empty, as the established server does."""
    import highdicom as hd

    info = info or {}
    labels = np.asarray(labels)
    values, sources = _labelled_series(labels, files)
    if not values:
        return None
    by_value = {s.value: s for s in segments}
    algorithm = algorithm_identification(info)
    descriptions, lut = [], np.zeros(int(labels.max()) + 1, dtype=np.uint16)
    for n, v in enumerate(values, start=1):
        descriptions.append(segment_description(n, by_value.get(v) or _unnamed(v), algorithm))
        lut[v] = n
    pixels = lut[labels]
    pixels = pixels.astype(np.uint8 if len(values) < 256 else np.uint16)
    seg = hd.seg.Segmentation(pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                              segment_descriptions=descriptions, **_seg_common(sources, info))
    _finish(seg, info, path)
    return values


def write_fractional_seg(probabilities, files, segments, path, info=None):
    """Write probability maps (``[channels, k, j, i]`` in [0, 1], one channel per entry of ``segments``) as a
    FRACTIONAL (PROBABILITY) DICOM SEG. Returns the label values written, or None when every map is 0."""
    import highdicom as hd

    info = info or {}
    probs = np.clip(np.asarray(probabilities, dtype=np.float32), 0.0, 1.0)
    if probs.ndim == 3:
        probs = probs[None]
    if len(segments) != probs.shape[0]:
        raise ValueError("%d probability channels for %d segments" % (probs.shape[0], len(segments)))
    if not probs.any():
        return None
    sources = _read_sources(files)
    pixels = np.moveaxis(probs, 0, -1)  # [k, j, i, segments]
    _check_frames(pixels, sources, "the probability map")
    algorithm = algorithm_identification(info)
    descriptions = [segment_description(n, s, algorithm) for n, s in enumerate(segments, start=1)]
    seg = hd.seg.Segmentation(pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
                              fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
                              max_fractional_value=255, segment_descriptions=descriptions,
                              **_seg_common(sources, info, " (probability)"))
    _finish(seg, info, path)
    return [s.value for s in segments]


def _unnamed(value):
    from .registry import PALETTE, Segment

    return Segment(int(value), "label %d" % value, PALETTE[(int(value) - 1) % len(PALETTE)])


# ---------------------------------------------------------------------------------------------------------- RTSTRUCT

def write_rtstruct(labels, files, segments, path, info=None):
    """Write the label map as an RTSTRUCT (one ROI per label that occurs, named and coloured as the segment) with
    rt-utils. ``RTStructUnavailable`` when rt-utils is not installed. Returns the label values written, or None
    when the map is empty."""
    try:
        from rt_utils import RTStruct
        from rt_utils import ds_helper, image_helper
    except ImportError:
        raise RTStructUnavailable("RTSTRUCT output needs rt-utils, which is not installed on this server (%s; it "
                                  "brings OpenCV)" % RTSTRUCT_EXTRA)
    info = info or {}
    labels = np.asarray(labels)
    values, sources = _labelled_series(labels, files)
    if not values:
        return None
    # rt-utils orders slices its own way (along the normal); map ours onto its order by SOP instance UID.
    ordered = sorted(sources, key=image_helper.get_slice_position)
    index = {ds.SOPInstanceUID: k for k, ds in enumerate(sources)}
    order = [index[ds.SOPInstanceUID] for ds in ordered]
    rt = RTStruct(ordered, ds_helper.create_rtstruct_dataset(ordered))
    rt.set_series_description(str(info.get("series_description") or "Segmentation")[:64])
    by_value = {s.value: s for s in segments}
    for v in values:
        seg = by_value.get(v) or _unnamed(v)
        mask = np.moveaxis(labels[order] == v, 0, -1)  # [rows, cols, slices in rt-utils' order]
        rt.add_roi(mask=mask, color=[int(c) for c in seg.color], name=str(seg.name)[:64])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    rt.save(path)
    return values


def probability_segments(segments: Sequence[Any], values: Sequence[int]):
    """The segment records for probability channels of label ``values``."""
    by_value = {s.value: s for s in segments}
    return [by_value.get(int(v)) or _unnamed(v) for v in values]


def seg_info(metadata: Optional[Dict[str, Any]], template: Optional[Dict[str, Any]], fallback_name: str):
    """SEG series attributes from a model's inline metadata and/or DCMQI template (the template wins)."""
    info = {k: v for k, v in (metadata or {}).items() if k not in ("path", "segment_names")}
    if template:
        first = (template.get("segmentAttributes") or [[{}]])[0] or [{}]
        for key, tkey in (("series_description", "SeriesDescription"), ("body_part_examined", "BodyPartExamined"),
                          ("clinical_trial_series_id", "ClinicalTrialSeriesID"),
                          ("clinical_trial_time_point_id", "ClinicalTrialTimePointID"),
                          ("series_number", "SeriesNumber"), ("instance_number", "InstanceNumber"),
                          ("content_creator_name", "ContentCreatorName")):
            if template.get(tkey) not in (None, ""):
                info[key] = template[tkey]
        if first[0].get("SegmentAlgorithmName"):
            info["algorithm_name"] = first[0]["SegmentAlgorithmName"]
    info.setdefault("algorithm_name", fallback_name)
    return info
