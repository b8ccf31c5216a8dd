"""Models that fail alone (issue 15 point 4), on a real server process: a registry with one good tiny model beside a
model whose result folder is missing, one whose metadata template is broken and one whose checkpoints are corrupt.

* the server starts and serves the good model; /model_info says which models cannot serve and why, /readyz lists
  them (and stays 200 while one model can serve);
* a request for an unavailable model is a 503 naming it (the established fields too), never an opaque 500; a
  checkpoint_name or fold that is not there is a 400 naming the file and what exists;
* many distinct failing requests leave the predictor cache bounded: no loading lock left behind, at most
  ``PredictorCache.MAX_FAILED`` failure records, no predictor.
"""

import json
import os
import sys

import numpy as np
import pytest
import requests

import tiny_nnunet
from conftest import SERVER_ENV, TORCH_THREADS, free_port, running
from test_auto_endpoints import SPACING, make_image

from SlicerNNInteractiveLib.client import RemoteSession
from SlicerNNInteractiveLib.errors import BadRequestError, ServerError

KEY = "model-failures-key"
CORRUPT_FILES = 40  # distinct corrupt checkpoints: more than the failures the cache remembers


def garbage(path):
    with open(path, "wb") as f:
        f.write(b"this is not a torch checkpoint " * 10)


@pytest.fixture(scope="module")
def world(tmp_path_factory, quiet_model):
    import SimpleITK as sitk

    root = tmp_path_factory.mktemp("model-failures")
    models = root / "models"
    tiny_nnunet.make_tiny_nnunet(str(models))
    corrupt = tiny_nnunet.make_tiny_nnunet(str(models), dataset_name="Dataset997_Corrupt")
    garbage(os.path.join(corrupt, "fold_0", "checkpoint_final.pth"))
    for i in range(CORRUPT_FILES):
        garbage(os.path.join(corrupt, "fold_0", "broken_%02d.pth" % i))
    (root / "metadata").mkdir()
    (root / "metadata" / "broken.json").write_text("{not json")
    spec = tiny_nnunet.write_spec(str(root / "model-serve-spec.yaml"), str(models))  # writes the good template
    import yaml

    with open(spec) as f:
        data = yaml.safe_load(f)
    good = data["models"][0]
    data["models"] += [
        {"id": "missing", "rel_path": "Dataset996_NotThere"},
        dict(good, id="bad_meta", aliases=[], name="bad meta", metadata={"path": "metadata/broken.json"}),
        {"id": "corrupt", "rel_path": "Dataset997_Corrupt"},
    ]
    with open(spec, "w") as f:
        yaml.safe_dump(data, f)
    study = root / "allowed" / "study1"
    study.mkdir(parents=True)
    volume = sitk.GetImageFromArray(make_image()[0])
    volume.SetSpacing(SPACING[::-1])
    sitk.WriteImage(volume, str(study / "ct.nii.gz"))
    port = free_port()
    url = "http://127.0.0.1:%d" % port
    cmd = [sys.executable, "-m", "nninteractive_slicer_server", "--model-dir", quiet_model, "--device", "cpu",
           "--port", str(port), "--torch-n-threads", TORCH_THREADS, "--no-autozoom", "--model-serve-spec", spec,
           "--infer-root", str(root / "allowed")]
    log = str(root / "server.log")
    with running(cmd, url, log, env=dict(SERVER_ENV, NN_INTERACTIVE_API_KEY=KEY)):
        yield type("World", (), dict(url=url, root=str(root), models=str(models), study=str(study), log=log))


def call(world, method, path, **kw):
    return requests.request(method, world.url + path, headers={"Authorization": "Bearer " + KEY}, timeout=120, **kw)


def infer(world, model, **fields):
    body = dict({"nnunet_id": model, "study_path": world.study, "series_folders": ["ct.nii.gz"],
                 "output_dir": os.path.join(os.path.dirname(world.study), "out_" + model)}, **fields)
    return call(world, "POST", "/infer", json=body)


def test_the_server_starts_and_says_which_models_cannot_serve(world):
    info = call(world, "GET", "/model_info").json()
    assert info["tiny_organs"]["available"] is True
    assert info["missing"]["available"] is False and "'Dataset996_NotThere'" in info["missing"]["unavailable_reason"]
    assert info["bad_meta"]["available"] is False and "broken.json" in info["bad_meta"]["unavailable_reason"]
    assert world.root not in json.dumps(info)  # reasons without server paths
    ready = call(world, "GET", "/readyz")
    assert ready.status_code == 200, ready.text  # the good model serves
    body = ready.json()
    assert set(body["unavailable_models"]) == {"missing", "bad_meta"} and body["models_available"] == 2
    with open(world.log) as f:
        text = f.read()
    assert "model 'missing' is unavailable" in text and "model 'bad_meta' is unavailable" in text


def test_a_request_for_an_unavailable_model_is_a_503_naming_it(world):
    for model in ("missing", "bad_meta"):
        r = infer(world, model)
        assert r.status_code == 503, r.text
        assert "model %r is unavailable" % model in r.json()["detail"] and r.json()["status"] == "failed"
        r = call(world, "POST", "/jobs", json={"nnunet_id": model, "study_path": world.study,
                                               "series_folders": ["ct.nii.gz"], "output_dir": world.study})
        assert r.status_code == 503 and model in r.json()["detail"]  # before any job exists
    r = infer(world, "tiny_organs")
    assert r.status_code == 200 and r.json()["status"] == "done"


def test_a_model_that_cannot_load_is_a_503_then_listed(world):
    r = infer(world, "corrupt")
    assert r.status_code == 503, r.text
    detail = r.json()["detail"]
    assert "model 'corrupt' cannot be loaded" in detail and "checkpoint_final.pth" in detail
    assert world.models not in detail and r.json()["status"] == "failed"
    info = call(world, "GET", "/model_info").json()["corrupt"]
    assert info["available"] is False and "cannot be loaded" in info["unavailable_reason"]
    body = call(world, "GET", "/readyz").json()
    assert "corrupt" in body["unavailable_models"] and body["predictor_cache"]["loading"] == 0
    r = infer(world, "tiny_organs", output_dir=os.path.join(os.path.dirname(world.study), "after"))
    assert r.status_code == 200  # the others still serve


def test_checkpoints_and_folds_must_exist(world):
    r = infer(world, "tiny_organs", checkpoint_name="checkpoint_best.pth")
    assert r.status_code == 400, r.text
    assert r.json()["detail"] == ("checkpoint_name: model 'tiny_organs' has no checkpoint_best.pth in fold_0 (there: "
                                  "checkpoint_final.pth)")
    r = infer(world, "tiny_organs", use_folds=[0, 3])
    assert r.status_code == 400 and "has no fold 3 (its folds: 0)" in r.json()["detail"]


def test_many_distinct_failing_requests_leave_the_cache_bounded(world):
    image = make_image()
    before = call(world, "GET", "/readyz").json()["predictor_cache"]
    with RemoteSession(world.url, api_key=KEY) as remote:
        remote.set_image(image, image_properties={"spacing": list(SPACING)})
        for i in range(150):
            with pytest.raises(BadRequestError, match="no checkpoint_%03d.pth in fold_0" % i):
                remote.auto_segment("tiny_organs", checkpoint_name="checkpoint_%03d.pth" % i)
        for i in range(CORRUPT_FILES):
            with pytest.raises(ServerError, match="model 'corrupt' cannot be loaded"):
                remote.auto_segment("corrupt", checkpoint_name="broken_%02d.pth" % i)
        bbox, region, labels, _ = remote.auto_segment("tiny_organs")  # the good model, on the same session
        assert labels and np.asarray(region).any()
    cache = call(world, "GET", "/readyz").json()["predictor_cache"]
    assert cache["loading"] == 0
    assert cache["load_failures"] - before["load_failures"] == CORRUPT_FILES
    assert cache["failed_remembered"] <= 32 < CORRUPT_FILES
    assert cache["size"] <= cache["max_size"] and {e["folder"] for e in cache["loaded"]} <= {
        tiny_nnunet.RESULT_SUBFOLDER}


def test_a_model_whose_files_come_back_is_available_again(tmp_path):
    """In process, with the registry's clock: a model marked at start-up is looked at again (at most every
    RECHECK_S) and serves once its folder is there."""
    from nninteractive_slicer_server.auto import registry as R

    models = tmp_path / "models"
    models.mkdir()
    spec = tiny_nnunet.write_spec(str(tmp_path / "spec.yaml"), str(models))
    reg = R.load_registry(spec, check_files=False)
    now = [0.0]
    reg.clock = lambda: now[0]
    assert list(reg.check_models()) == ["tiny_organs"]
    with pytest.raises(R.ModelUnavailable, match="'tiny_organs' is unavailable"):
        reg.result_folder("tiny_organs")
    tiny_nnunet.make_tiny_nnunet(str(models))
    assert reg.unavailable_reason("tiny_organs")  # not looked at again yet
    now[0] = reg.RECHECK_S
    assert reg.unavailable_reason("tiny_organs") is None
    assert os.path.isdir(reg.result_folder("tiny_organs"))
