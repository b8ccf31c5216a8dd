"""The body of ``POST /infer`` (and the ``request`` field of ``POST /infer_file``): the established nnU-Net server's
request, field for field, so that its clients' bodies run unchanged. ``GET /request-params`` answers this model's
JSON schema.

Written from the established server's public documentation (names, types, defaults); only the checks differ:
``checkpoint_name`` takes any checkpoint file name (the established server only ``checkpoint_final.pth`` and
``checkpoint_best.pth``), and fields the request does not set are left unset, so that a model's ``default_args``
(model-serve-spec.yaml) fill them (``fields_set``).

Per-model values: a request naming several models (a cascade, ``nnunet_id: [a, b]``) may give ``class_idx``,
``proba_threshold``, ``min_confidence``, ``use_folds``, ``checkpoint_name``, ``cascade_mode`` and
``series_folders`` per model, as lists.

This is the one definition of the request: ``/request-params`` answers its schema, the routes check a body with it
before taking a run slot, and ``pipeline.run_study`` (behind ``/infer``, ``/infer_file`` and the ``nnunet-predict``
commands) checks every request with it again (``parse_request``): unknown fields are refused, types are checked
here, and what depends on the models (how many values per stage, known labels, folds) is checked by the pipeline.
Types are as wide as the commands' flags and the established bodies need (``use_folds: 0`` or ``[0, 1]``,
``crop_padding: 5`` or ``[5]`` or ``[x, y, z]``); an int ``remove_objects_smaller_than`` stays an int (voxels) and a
float stays a float (a fraction of the largest object).
"""

from enum import Enum
from typing import List, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..validate import BadInput


class CascadeMode(str, Enum):
    INTERSECT = "intersect"
    CROP = "crop"


# The request fields that name files or folders on the server: each is confined to the operator's --infer-root
# directories (or, for /infer_file, to the job's own folder) before anything reads or writes there.
PATH_FIELDS = ("study_path", "output_dir", "crop_from", "intersect_with", "tmp_dir")


class InferenceRequestBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    nnunet_id: Union[str, List[str]] = Field(
        ..., description="Model id, alias or name from the server's model registry (GET /model_info), or a list of "
                         "them (a cascade: each model's output can feed the next).")
    output_dir: str = Field(..., description="Output directory on the server (inside an --infer-root directory).")
    class_idx: Optional[Union[int, List[Optional[Union[int, List[int]]]]]] = Field(
        None, description="Label value(s) kept from each prediction (per model in a cascade).")
    checkpoint_name: Union[str, List[str]] = Field(
        "checkpoint_final.pth", description="nnU-Net checkpoint file name (per model in a cascade), e.g. "
                                            "checkpoint_final.pth or checkpoint_best.pth.")
    tmp_dir: str = Field(".tmp", description="Directory for temporary outputs.")
    is_dicom: bool = Field(False, description="Whether the series folders hold DICOM series (outputs then include "
                                              "a DICOM SEG).")
    tta: bool = Field(False, description="Test-time augmentation (mirroring).")
    use_folds: Union[int, str, List[Union[int, str, List[Union[int, str]]]]] = Field(
        [0], description="Folds to use: a fold, 'all', or a list of folds (a list of lists: per model in a cascade).")
    proba_threshold: Optional[Union[float, List[Optional[float]]]] = Field(
        None, description="Probability threshold(s) for the model output (per model in a cascade).")
    min_confidence: Optional[Union[float, List[Optional[float]]]] = Field(
        None, description="Minimum confidence of a kept object (per model in a cascade).")
    min_intersection: Optional[float] = Field(
        0.1, description="Minimum intersection of an object with intersect_with (or the previous stage) to keep it.")
    crop_padding: Optional[Union[Tuple[int, int, int], List[int], int]] = Field(
        (10, 10, 10), description="Padding (voxels, x y z; one number for all) around the crop_from / previous stage "
                                  "bounding box.")
    remove_objects_smaller_than: Optional[Union[int, float, List[Optional[Union[int, float]]]]] = Field(
        None, description="Per label, remove objects smaller than this: a number of voxels (an integer) or a fraction "
                          "of the label's largest object (a float); per model in a cascade.")
    cascade_mode: Union[CascadeMode, List[CascadeMode]] = Field(
        CascadeMode.INTERSECT, description="Crop a stage's input to the previous stage's bounding box ('crop'), or "
                                           "keep the objects that intersect it ('intersect').")
    save_proba_map: bool = Field(False, description="Also save the probability map (needs proba_threshold).")
    save_nifti_inputs: bool = Field(False, description="Save the inputs as NIfTI when they are DICOM.")
    save_rt_struct_output: bool = Field(False, description="Also save an RT STRUCT (DICOM input only).")
    suffix: Optional[str] = Field(None, description="Suffix of the output file names (prediction_<suffix>.nii.gz).")
    flip_xy: Optional[Union[bool, List[Optional[bool]]]] = Field(
        None, description="Flip the image's two in-plane axes before the model and back after it (per model in a "
                          "cascade; default: the model's default_args, else true for TotalSegmentator tasks).")
    bvalue_for_filtering: Optional[float] = Field(
        None, description="A DICOM series of several b-values is read as the files of the b-value closest to this "
                          "one (a series of several b-values is refused without it).")


class InferenceRequest(InferenceRequestBase):
    study_path: str = Field(..., description="The study folder on the server (inside an --infer-root directory).")
    series_folders: Optional[Union[List[str], List[List[str]]]] = Field(
        None, description="Series folders relative to study_path (a list per model in a cascade); 'from:<model>' "
                          "takes a previous stage's output.")
    crop_from: Optional[str] = Field(None, description="Crop the input to the bounding box of this mask (a path).")
    intersect_with: Optional[str] = Field(
        None, description="Keep the objects that intersect this mask (a path) by at least min_intersection.")


class InferenceRequestFile(InferenceRequestBase):
    """``/infer_file``: the study comes in the uploaded archive, and the outputs go to the job's folder."""

    output_dir: Optional[str] = Field(None, description="Ignored: outputs go to the job's folder (GET "
                                                        "/download/{job_id}).")
    study_path: Optional[str] = Field(None, description="Ignored: the study is the uploaded archive.")
    series_folders: Optional[Union[List[str], List[List[str]]]] = Field(
        None, description="Series folders relative to the archive's top (a list per model in a cascade).")
    crop_from: Optional[str] = Field(None, description="A mask inside the archive (a path relative to its top).")
    intersect_with: Optional[str] = Field(None, description="A mask inside the archive (a path relative to its top).")


class InferenceRequestOrthanc(InferenceRequestBase):
    """``/infer_orthanc``: the series come from the operator's Orthanc by their identifiers (DICOM, so ``is_dicom``
    is true), the outputs go to a folder of the server's own and the DICOM SEGs back to Orthanc."""

    output_dir: Optional[str] = Field(None, description="Ignored: the outputs go to a folder of the server's own, "
                                                        "and the DICOM SEGs to Orthanc.")
    series_ids: Union[List[str], List[List[str]]] = Field(
        ..., description="Orthanc series identifiers (as GET /series on Orthanc lists them), one per model channel; "
                         "a list per model in a cascade; from:<model> entries as in series_folders.")
    crop_from: Optional[str] = Field(None, description="Crop the input to the bounding box of this mask (a path "
                                                       "inside an --infer-root directory).")
    intersect_with: Optional[str] = Field(
        None, description="Keep the objects that intersect this mask (a path inside an --infer-root directory).")


def set_fields(req):
    """The fields the request set, JSON-able (enums as their values): what overrides a model's default_args."""
    return req.model_dump(mode="json", exclude_unset=True)


FIELDS = tuple(InferenceRequest.model_fields)


def parse_request(payload, model=InferenceRequest):
    """``payload`` (a JSON object) checked against ``model``: the fields it set, JSON values (``set_fields``).
    ``BadInput`` (400) naming every wrong field; unknown fields are named with the known ones."""
    if not isinstance(payload, dict):
        raise BadInput("the request must be a JSON object with the fields %s" % ", ".join(model.model_fields))
    unknown = sorted(str(k) for k in payload if k not in model.model_fields)
    if unknown:
        raise BadInput("unknown request field(s): %s (the fields: %s)" % (", ".join(unknown),
                                                                          ", ".join(model.model_fields)))
    try:
        return set_fields(model.model_validate(payload))
    except ValidationError as exc:
        by_field = {}  # a union's members each report: one line per field, their messages joined
        for e in exc.errors():
            loc = e.get("loc", ())
            msgs = by_field.setdefault(str(loc[0]) if loc else "(body)", [])
            if e.get("msg") and e["msg"] not in msgs:
                msgs.append(e["msg"])
        raise BadInput("invalid request: %s" % "; ".join(
            "%s: %s (got %r)" % (name, " or ".join(msgs), payload.get(name)) for name, msgs in by_field.items()))
