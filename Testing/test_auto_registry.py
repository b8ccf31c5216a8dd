"""The automatic-model registry (model-serve-spec.yaml), its validate command, nnU-Net predictors on the CPU, their
cache and the wait for free GPU memory.

The predictor tests run the real nnU-Net (``nnUNetPredictor``) on a tiny random-weight result folder that the tests
build (Testing/models/tiny_nnunet.py); TotalSegmentator is not installed here, so its tests use a stand-in package
with TotalSegmentator's module layout (config / libs / map_tasks_config / map_to_binary) on sys.path.
"""

import copy
import json
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import tiny_nnunet
from nninteractive_slicer_server.auto import registry as R
from nninteractive_slicer_server.auto import spec_cli
from nninteractive_slicer_server.auto.predictors import (MiB, AutoSegmenter, NotEnoughGPUMemory, PredictorCache,
                                                         threshold_components, wait_for_gpu_memory)
from nninteractive_slicer_server.errors import Unavailable
from nninteractive_slicer_server.scheduler import DeviceQueue
from nninteractive_slicer_server.validate import BadInput

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SPEC = """
model_folder: {folder}
load_timeout_min: 60
models:
  - id: organs_ct
    rel_path: Dataset998_TinyOrgans
    name: "Tiny organs"
    aliases: [organs, abdomen]
    metadata:
      path: metadata/tiny-organs.json
      algorithm_name: ignored-because-path-wins
      segment_names: [ignored]
    min_mem: 4000
    default_args:
      series_folders: ["inputs/seriesCT"]
      use_folds: [0]
      tta: false
      checkpoint_name: checkpoint_final.pth
  - id: lesion_ct
    rel_path: Dataset997_TinyLesion
    name: "Tiny lesion"
    metadata:
      algorithm_name: "LesionNet"
      algorithm_version: "v1.0"
      series_description: "Lesion candidates"
      segment_names:
        - "Neoplasm"
        - name: "Cyst"
          label: "Kidney cyst"
          number: 2
          code: "367643001"
    min_mem: 2000
    default_args:
      use_folds: [0]
      proba_threshold: 0.1
      min_confidence: 0.5
      class_idx: 1
      save_proba_map: true
  - id: total_fast_ct
    totalseg_task: total_fast
"""


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("auto")
    folder = root / "models"
    organs = tiny_nnunet.make_tiny_nnunet(str(folder))
    lesion = tiny_nnunet.make_tiny_nnunet(str(folder), labels=("neoplasm", "cyst"), dataset_name="Dataset997_TinyLesion")
    (root / "metadata").mkdir()
    (root / "metadata" / "tiny-organs.json").write_text(json.dumps(tiny_nnunet.dcmqi_template()))
    return {"root": root, "folder": str(folder), "organs": organs, "lesion": lesion}


def write(root, text, name="model-serve-spec.yaml"):
    path = os.path.join(str(root), name)
    with open(path, "w") as f:
        f.write(text)
    return path


@pytest.fixture(scope="module")
def spec_path(models_dir):
    return write(models_dir["root"], SPEC.format(folder=models_dir["folder"]))


@pytest.fixture(scope="module")
def reg(spec_path):
    return R.load_registry(spec_path)


# ---------------------------------------------------------------------------------------------------------- parsing

def test_spec_parsed(reg, models_dir):
    assert reg.ids() == ["organs_ct", "lesion_ct", "total_fast_ct"]
    assert reg.model_folder == models_dir["folder"]
    assert reg.load_timeout_min == 60
    for name in ("organs_ct", "organs", "abdomen", "Tiny organs"):
        assert reg.get(name).id == "organs_ct"
    organs, lesion, total = (reg.get(i) for i in reg.ids())
    assert organs.aliases == ["organs", "abdomen"] and organs.min_mem == 4000
    assert organs.default_args == {"series_folders": ["inputs/seriesCT"], "use_folds": [0], "tta": False,
                                   "checkpoint_name": "checkpoint_final.pth"}
    assert lesion.default_args["proba_threshold"] == 0.1 and lesion.default_args["class_idx"] == 1
    # metadata: a template path is resolved beside the spec and wins over inline fields given with it
    assert organs.metadata_path == str(models_dir["root"] / "metadata" / "tiny-organs.json")
    assert [s.name for s in reg.segments("organs")] == ["liver", "spleen"]
    assert lesion.metadata_path is None and lesion.metadata["algorithm_name"] == "LesionNet"
    # TotalSegmentator entry: name defaults as the established server names it, is_totalseg implied
    assert total.is_totalseg and total.totalseg_task == "total_fast" and total.name == "totalseg_total_fast"
    assert total.rel_path is None and total.min_mem is None
    assert reg.merged_args("organs", {"tta": True}) == dict(organs.default_args, tta=True)


def test_result_folders_found_by_substring(reg, models_dir):
    assert reg.result_folder("organs") == models_dir["organs"]
    assert reg.result_folder("lesion_ct") == models_dir["lesion"]


def test_segments_from_template_inline_and_dataset_json(reg, models_dir, tmp_path):
    liver, spleen = reg.segments("organs_ct")
    assert (liver.value, liver.name, liver.color) == (1, "liver", (216, 101, 79))
    assert spleen.color == (157, 108, 162)
    assert liver.terminology["type"] == {"CodeValue": "10200004", "CodingSchemeDesignator": "SCT",
                                         "CodeMeaning": "Liver"}
    assert liver.terminology["category"]["CodeMeaning"] == "Anatomical Structure"
    neoplasm, cyst = reg.segments("lesion_ct")
    assert (neoplasm.value, neoplasm.name) == (1, "Neoplasm")  # a bare name: its SNOMED CT concept, as established
    assert neoplasm.terminology["type"] == {"CodeValue": "108369006", "CodingSchemeDesignator": "SCT",
                                            "CodeMeaning": "Neoplasm"}
    assert neoplasm.terminology["category"]["CodeValue"] == "49755003"  # DICOM CID 7194: morphologically abnormal
    assert (cyst.value, cyst.name) == (2, "Kidney cyst")
    assert cyst.terminology["type"]["CodeValue"] == "367643001"
    # no metadata: names from dataset.json, colours from the palette
    bare = R.Registry({"model_folder": models_dir["folder"], "models": [{"id": "m", "rel_path": "TinyOrgans"}]},
                      base_dir=str(tmp_path))
    segs = bare.segments("m")
    assert [(s.value, s.name) for s in segs] == [(1, "liver"), (2, "spleen")]
    assert segs[0].color == R.PALETTE[0] and segs[1].color == R.PALETTE[1] and segs[0].terminology is None
    described = bare.describe("m", resolve=True)
    assert described["labels"][1] == {"value": 2, "name": "spleen", "color": list(R.PALETTE[1])}
    assert models_dir["folder"] not in json.dumps(described)  # no server path in what clients see


def test_unknown_model_lists_known(reg):
    with pytest.raises(R.UnknownModel) as e:
        reg.get("prostate")
    assert isinstance(e.value, BadInput)  # the HTTP layer answers 400
    msg = str(e.value)
    assert "'prostate'" in msg and "organs_ct, lesion_ct, total_fast_ct" in msg and "abdomen (organs_ct)" in msg
    assert e.value.known_ids == ["organs_ct", "lesion_ct", "total_fast_ct"]
    assert "organs" in reg and "prostate" not in reg


def base_spec(folder="/models"):
    return {"model_folder": folder, "models": [
        {"id": "a", "rel_path": "A", "name": "Model A", "aliases": ["x"],
         "metadata": {"algorithm_name": "A", "segment_names": ["Liver", {"name": "Cyst", "number": 2}]},
         "min_mem": 100, "default_args": {"use_folds": [0, 1], "tta": True}},
        {"id": "b", "rel_path": "B"}]}


def mutate(path, value):
    """A copy of base_spec() with the value at ``path`` (keys / indexes) replaced (``DELETE`` removes it)."""
    spec = base_spec()
    node = spec
    for key in path[:-1]:
        node = node[key]
    if value is DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return spec


DELETE = object()
INVALID = [
    # (path, value, entry in the message, field)
    (("model_folder",), DELETE, "top level", "model_folder"),
    (("model_folder",), 3, "top level", "model_folder"),
    (("models",), [], "top level", "models"),
    (("models",), {"a": {}}, "top level", "models"),
    (("models", 1), "b", "models[1]", "(entry)"),
    (("models", 1, "id"), DELETE, "models[1]", "id"),
    (("models", 1, "id"), "a", "models[1] (id 'a')", "id"),
    (("models", 1, "id"), "x", "models[1] (id 'x')", "id"),
    (("models", 1, "rel_path"), DELETE, "models[1] (id 'b')", "rel_path"),
    (("models", 1, "rel_path"), ["B"], "models[1] (id 'b')", "rel_path"),
    (("models", 1, "name"), "", "models[1] (id 'b')", "name"),
    (("models", 1, "aliases"), "bee", "models[1] (id 'b')", "aliases"),
    (("models", 1, "aliases"), ["x"], "models[1] (id 'b')", "aliases"),
    (("models", 1, "aliases"), ["a"], "models[1] (id 'b')", "aliases"),
    (("models", 0, "min_mem"), -1, "models[0] (id 'a')", "min_mem"),
    (("models", 0, "min_mem"), "4G", "models[0] (id 'a')", "min_mem"),
    (("models", 0, "metadata"), "meta.json", "models[0] (id 'a')", "metadata"),
    (("models", 0, "metadata"), {"path": ""}, "models[0] (id 'a')", "metadata.path"),
    (("models", 0, "metadata", "segment_names"), "Liver", "models[0] (id 'a')", "metadata.segment_names"),
    (("models", 0, "metadata", "segment_names", 1), {"label": "no name"}, "models[0] (id 'a')",
     "metadata.segment_names[1]"),
    (("models", 0, "metadata", "segment_names", 1, "number"), 0, "models[0] (id 'a')",
     "metadata.segment_names[1].number"),
    (("models", 0, "metadata", "algorithm_name"), ["A"], "models[0] (id 'a')", "metadata.algorithm_name"),
    (("models", 0, "default_args"), [0], "models[0] (id 'a')", "default_args"),
    (("models", 0, "default_args", "use_folds"), ["first"], "models[0] (id 'a')", "default_args.use_folds"),
    (("models", 0, "default_args", "tta"), "yes", "models[0] (id 'a')", "default_args.tta"),
    (("models", 0, "default_args", "proba_threshold"), 1.5, "models[0] (id 'a')", "default_args.proba_threshold"),
    (("models", 0, "default_args", "min_confidence"), "high", "models[0] (id 'a')", "default_args.min_confidence"),
    (("models", 0, "default_args", "class_idx"), 0, "models[0] (id 'a')", "default_args.class_idx"),
    (("models", 0, "default_args", "checkpoint_name"), "../x.pth", "models[0] (id 'a')",
     "default_args.checkpoint_name"),
    (("models", 1, "totalseg_task"), ["total"], "models[1] (id 'b')", "totalseg_task"),
    (("models", 1, "is_totalseg"), "yes", "models[1] (id 'b')", "is_totalseg"),
    (("load_timeout_min",), 0, "top level", "load_timeout_min"),
]


@pytest.mark.parametrize("path,value,entry,field", INVALID, ids=["%s=%r" % ("/".join(map(str, p)), v)
                                                                  for p, v, _e, _f in INVALID])
def test_invalid_spec_names_entry_and_field(path, value, entry, field):
    with pytest.raises(R.SpecError) as e:
        R.Registry(mutate(path, value), path="/srv/model-serve-spec.yaml", check_files=False)
    msg = str(e.value)
    assert msg.startswith("/srv/model-serve-spec.yaml: %s" % entry), msg
    assert "field '%s'" % field in msg, msg
    assert e.value.field == field


def test_spec_valid_as_given():
    reg = R.Registry(base_spec(), check_files=False)
    assert reg.ids() == ["a", "b"] and reg.get("x").id == "a" and reg.get("Model A").id == "a"
    assert [(s.value, s.name) for s in reg.segments("a", resolve=False)] == [(1, "Liver"), (2, "Cyst")]


def test_unknown_fields_are_warnings(tmp_path):
    spec = base_spec()
    spec["models"][0]["tta"] = False  # misplaced: belongs under default_args (the established example has this)
    spec["models"][0]["default_args"]["use_fold"] = [0]
    spec["gpu"] = 0
    reg = R.Registry(spec, check_files=False)
    text = "\n".join(reg.warnings)
    assert "models[0] (id 'a'), field 'tta': unknown field, ignored (model defaults go under default_args)" in text
    assert "field 'default_args.use_fold': unknown request field" in text
    assert "top level, field 'gpu'" in text


def test_file_errors_at_load(models_dir, tmp_path):
    folder = models_dir["folder"]
    cases = [
        ({"model_folder": str(tmp_path / "nowhere"), "models": [{"id": "a", "rel_path": "A"}]},
         "top level, field 'model_folder'", "is not a folder"),
        ({"model_folder": folder, "models": [{"id": "a", "rel_path": "Dataset123_Missing"}]},
         "models[0] (id 'a'), field 'rel_path'", "no nnU-Net result folder"),
        ({"model_folder": folder, "models": [{"id": "a", "rel_path": "TinyOrgans",
                                              "metadata": {"path": "meta/missing.json"}}]},
         "models[0] (id 'a'), field 'metadata.path'", "cannot be read"),
    ]
    bad = copy.deepcopy(tiny_nnunet.dcmqi_template())
    del bad["segmentAttributes"][0][1]["SegmentedPropertyTypeCodeSequence"]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    cases.append(({"model_folder": folder, "models": [{"id": "a", "rel_path": "TinyOrgans",
                                                       "metadata": {"path": "bad.json"}}]},
                  "field 'metadata.path'", "segmentAttributes[0][1]: 'SegmentedPropertyTypeCodeSequence' is "
                                           "required"))
    (tmp_path / "notjson.json").write_text("{")
    cases.append(({"model_folder": folder, "models": [{"id": "a", "rel_path": "TinyOrgans",
                                                       "metadata": {"path": "notjson.json"}}]},
                  "field 'metadata.path'", "is not valid JSON"))
    for spec, where, what in cases:
        with pytest.raises(R.SpecError) as e:
            R.Registry(spec, path=str(tmp_path / "s.yaml"))
        assert where in str(e.value) and what in str(e.value), str(e.value)
    with pytest.raises(R.SpecError, match="field '\\(file\\)': is not valid YAML"):
        R.load_registry(write(tmp_path, "models: [\n", "broken.yaml"))
    with pytest.raises(R.SpecError, match="field '\\(file\\)': cannot be read"):
        R.load_registry(str(tmp_path / "absent.yaml"))


def test_spec_path_from():
    assert R.spec_path_from("cli.yaml", {"MODEL_SERVE_SPEC": "env.yaml"}) == "cli.yaml"
    assert R.spec_path_from(None, {"MODEL_SERVE_SPEC": "env.yaml"}) == "env.yaml"
    assert R.spec_path_from(None, {}) is None


# ---------------------------------------------------------------------------------------------------------- validate

def run_validate(*argv):
    import io

    out = io.StringIO()
    if argv and argv[0] == "list":
        code = spec_cli.list_models(argv[1], out=out)
    else:
        a = list(argv)
        strict = "--strict" in a
        a = [x for x in a if x != "--strict"]
        code = spec_cli.validate(a[0], strict=strict, out=out)
    return code, out.getvalue()


def test_validate_command(models_dir, spec_path, tmp_path):
    code, out = run_validate(spec_path)
    assert code == 0, out
    assert "is valid: 3 model(s) (organs_ct, lesion_ct, total_fast_ct)" in out
    assert "TotalSegmentator is not installed" in out and R.TOTALSEG_EXTRA in out  # a warning, not an error
    code, out = run_validate(spec_path, "--strict")
    assert code == 1 and "is not valid: 0 error(s), 1 warning(s)" in out
    # every problem at once, each naming entry and field
    text = SPEC.format(folder=models_dir["folder"]).replace("metadata/tiny-organs.json", "metadata/gone.json") \
        .replace("Dataset997_TinyLesion", "Dataset996_Nothing")
    code, out = run_validate(write(tmp_path, text))
    assert code == 1, out
    assert "models[0] (id 'organs_ct'), field 'metadata.path'" in out
    assert "models[1] (id 'lesion_ct'), field 'rel_path'" in out and "2 error(s)" in out
    # deep checks: template labels the model lacks, checkpoints of the default folds
    text = SPEC.format(folder=models_dir["folder"]).replace("use_folds: [0]\n      tta", "use_folds: [0, 3]\n      tta")
    code, out = run_validate(write(tmp_path, text, "folds.yaml"))
    assert code == 1 and "field 'default_args.use_folds'" in out and "fold_3" in out
    # a form error stops at load
    code, out = run_validate(write(tmp_path, "model_folder: /x\nmodels:\n  - id: a\n", "form.yaml"))
    assert code == 1 and "models[0] (id 'a'), field 'rel_path'" in out
    code, out = run_validate("list", spec_path)
    assert code == 0 and json.loads(out)[0]["labels"][0]["name"] == "liver"


def test_validate_console_exit_codes(spec_path, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(REPO, "server"),
                                                       os.path.join(REPO, "SlicerNNInteractive")]),
               MODEL_SERVE_SPEC=spec_path)
    cmd = [sys.executable, "-m", "nninteractive_slicer_server.auto.spec_cli"]
    ok = subprocess.run(cmd + ["validate"], env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "is valid" in ok.stdout, ok.stdout + ok.stderr
    bad = subprocess.run(cmd + ["validate", write(tmp_path, "models: 3\n")], env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 1 and "top level, field 'model_folder'" in bad.stdout
    usage = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert usage.returncode == 2


# ---------------------------------------------------------------------------------------------------------- TotalSegmentator

def test_totalseg_without_the_package(reg):
    with pytest.raises(R.ModelUnavailable) as e:
        reg.result_folder("total_fast_ct")
    assert isinstance(e.value, Unavailable) and e.value.status == 503
    assert "TotalSegmentator" in str(e.value) and 'nninteractive-slicer-server[totalsegmentator]' in str(e.value)


@pytest.fixture
def fake_totalseg(tmp_path, monkeypatch):
    """A stand-in with TotalSegmentator's module layout; its downloader writes a tiny result folder."""
    pkg = tmp_path / "site" / "totalsegmentator"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "config.py").write_text(textwrap.dedent("""
        import os
        from pathlib import Path
        def get_weights_dir():
            return Path(os.environ["TOTALSEG_WEIGHTS_PATH"])
    """))
    (pkg / "libs.py").write_text(textwrap.dedent("""
        import os
        import tiny_nnunet
        from totalsegmentator.config import get_weights_dir
        DOWNLOADS = []
        def download_pretrained_weights(task_id):
            DOWNLOADS.append(task_id)
            name = "Dataset%03d_TotalSegmentator_total_3mm_1559subj" % task_id
            if not os.path.isdir(os.path.join(str(get_weights_dir()), name)):
                tiny_nnunet.make_tiny_nnunet(str(get_weights_dir()), labels=("spleen", "kidney_right"),
                                             dataset_name=name)
    """))
    (pkg / "map_tasks_config.py").write_text(
        "TASK_CONFIGS = {'total': {'sub_modes': {'fast': {'task_id': 297}, 'fastest': {'task_id': 298},"
        " 'default': {'task_id': [291, 292, 293, 294, 295]}}}, 'liver_vessels': {'task_id': 8}}\n")
    (pkg / "map_to_binary.py").write_text("class_map = {'total': {1: 'spleen', 2: 'kidney_right'}}\n"
                                          "class_map_5_parts = {'class_map_part_organs': {1: 'spleen'}}\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delenv(R.TOTALSEG_WEIGHTS_ENV, raising=False)
    yield pkg
    for name in [m for m in sys.modules if m == "totalsegmentator" or m.startswith("totalsegmentator.")]:
        del sys.modules[name]
    os.environ.pop(R.TOTALSEG_WEIGHTS_ENV, None)


def test_totalseg_task_fetched_on_first_use(fake_totalseg, tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    spec = {"model_folder": str(folder), "models": [{"id": "total_fast_ct", "totalseg_task": "total_fast"},
                                                   {"id": "total", "totalseg_task": "total"},
                                                   {"id": "nope", "totalseg_task": "no_such_task"},
                                                   {"id": "organs", "totalseg_task": "organ_ct"}]}
    reg = R.Registry(spec)  # nothing fetched at load
    assert not os.path.exists(folder / "totalseg")
    # segment names from TotalSegmentator's class map, before any download
    assert [(s.value, s.name) for s in reg.segments("total_fast_ct", resolve=False)] == [(1, "spleen"),
                                                                                         (2, "kidney_right")]
    assert [s.name for s in reg.segments("organs", resolve=False)] == ["spleen"]
    found = reg.result_folder("total_fast_ct")
    assert found.startswith(str(folder / "totalseg" / "Dataset297_TotalSegmentator"))  # under model_folder/totalseg
    assert R.is_result_folder(found)
    from totalsegmentator import libs

    assert libs.DOWNLOADS == [297]
    assert reg.result_folder("total_fast_ct") == found and libs.DOWNLOADS == [297]  # remembered
    with pytest.raises(R.ModelUnavailable, match="several parts .*291, 292.* register one part per model"):
        reg.result_folder("total")
    with pytest.raises(R.ModelUnavailable, match="'no_such_task' is not one this TotalSegmentator knows"):
        reg.result_folder("nope")
    assert R.totalseg_task_id("liver_vessels") == 8 and R.totalseg_task_id(298) == 298
    assert R.totalseg_task_id("total_fastest") == 298


# ---------------------------------------------------------------------------------------------------------- memory

class FakeGPU:
    """Reports free memory from a script of values (MiB) and advances a fake clock on sleep."""

    def __init__(self, free_mib, total_mib=24000):
        self.free, self.total, self.now, self.probes, self.released = list(free_mib), total_mib, 0.0, 0, 0

    def probe(self, device):
        self.probes += 1
        free = self.free.pop(0) if len(self.free) > 1 else self.free[0]
        return free * MiB, self.total * MiB

    def sleep(self, s):
        self.now += s

    def clock(self):
        return self.now

    def release(self, device):
        self.released += 1


def test_min_mem_wait():
    gpu = FakeGPU([100])
    assert wait_for_gpu_memory(4000, "cpu", probe=gpu.probe) is None and gpu.probes == 0  # CPU: nothing to wait for
    assert wait_for_gpu_memory(None, "cuda", probe=gpu.probe) is None and gpu.probes == 0
    gpu = FakeGPU([5000])
    assert wait_for_gpu_memory(4000, "cuda:0", probe=gpu.probe, sleep=gpu.sleep, clock=gpu.clock) == 5000
    gpu = FakeGPU([1000, 2000, 3000, 4500])  # memory frees up while it waits
    got = wait_for_gpu_memory(4000, "cuda", timeout_s=10, probe=gpu.probe, poll_s=0.5, sleep=gpu.sleep,
                              clock=gpu.clock, release=gpu.release)
    assert got == 4500 and gpu.released == 1 and gpu.now == 1.0


def test_min_mem_gives_up_clearly():
    gpu = FakeGPU([1500], total_mib=8000)
    with pytest.raises(NotEnoughGPUMemory) as e:
        wait_for_gpu_memory(4000, "cuda:1", timeout_s=30, probe=gpu.probe, poll_s=0.5, sleep=gpu.sleep,
                            clock=gpu.clock, what="model 'organs_ct'")
    assert str(e.value) == ("model 'organs_ct' needs 4000 MiB of free GPU memory on cuda:1; only 1500 of 8000 MiB "
                            "were free after waiting 30 s (other work on the GPU holds the rest); try again later")
    assert e.value.status == 503 and "Retry-After" in e.value.headers
    assert gpu.now == pytest.approx(30.0)


# ---------------------------------------------------------------------------------------------------------- cache

class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def result_folders(root, names=("a", "b", "c"), folds=("0", "1", "all"), checkpoints=("checkpoint_final.pth",
                                                                                     "checkpoint_best.pth")):
    """Result folders the cache can check (fold folders with checkpoint files; the loaders here never read them)."""
    out = {}
    for name in names:
        for fold in folds:
            os.makedirs(os.path.join(str(root), name, "fold_%s" % fold), exist_ok=True)
            for ckpt in checkpoints:
                open(os.path.join(str(root), name, "fold_%s" % fold, ckpt), "wb").close()
        out[name] = os.path.join(str(root), name)
    return out


def test_cache_hits_ttl_size_and_expire(tmp_path):
    m = result_folders(tmp_path)
    loads = []
    clock = Clock()
    cache = PredictorCache("cpu", max_size=2, ttl_s=60, clock=clock,
                           loader=lambda folder, folds, ckpt: loads.append((folder, folds, ckpt)) or object())
    a = cache.get(m["a"], [0], "checkpoint_final.pth")
    assert cache.get(m["a"], ["0"], "checkpoint_final.pth") is a and (cache.hits, cache.misses) == (1, 1)
    assert cache.get(m["a"], [0, 1], "checkpoint_final.pth") is not a  # other folds: another predictor
    assert loads[-1] == (m["a"], [0, 1], "checkpoint_final.pth")
    cache.get(m["b"], ["all"], "checkpoint_best.pth")  # third entry: the least recently used (a, fold 0) goes
    assert len(cache) == 2 and cache.evictions == 1
    cache.get(m["a"], [0], "checkpoint_final.pth")
    assert len(loads) == 4
    clock.now = 59.0
    cache.get(m["b"], ["all"], "checkpoint_best.pth")  # used: its clock restarts
    clock.now = 61.0
    assert cache.sweep() == 1 and len(cache) == 1  # (a, fold 0) unused for 61 s
    clock.now = 200.0
    cache.get(m["c"], [0], "checkpoint_final.pth")  # every get sweeps first
    assert cache.stats()["size"] == 1
    assert cache.expire() == 1 and len(cache) == 0 and cache.expire() == 0


def test_cache_loads_once_under_concurrency(tmp_path):
    m = result_folders(tmp_path, names=("a",))
    gate = threading.Event()
    loads = []

    def slow(folder, folds, ckpt):
        loads.append(folder)
        gate.wait(5)
        return object()

    cache = PredictorCache("cpu", max_size=2, ttl_s=60, loader=slow)
    got = []
    threads = [threading.Thread(target=lambda: got.append(cache.get(m["a"], [0], "checkpoint_final.pth")))
               for _ in range(4)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join(10)
    assert len(loads) == 1 and len(got) == 4 and all(g is got[0] for g in got)
    assert cache.stats()["loading"] == 0


def test_missing_folds_and_checkpoints_never_reach_the_loader(tmp_path):
    m = result_folders(tmp_path, names=("a",), folds=("0", "1"))
    loads = []
    cache = PredictorCache("cpu", loader=lambda *a: loads.append(a) or object())
    for i in range(200):  # many distinct names: nothing of them stays
        with pytest.raises(BadInput) as e:
            cache.get(m["a"], [0], "checkpoint_%d.pth" % i, model="organs")
    assert str(e.value) == ("checkpoint_name: model 'organs' has no checkpoint_199.pth in fold_0 (there: "
                            "checkpoint_best.pth, checkpoint_final.pth)")
    with pytest.raises(BadInput, match=r"use_folds: model 'organs' has no fold 4 \(its folds: 0, 1\)"):
        cache.get(m["a"], [0, 4], "checkpoint_final.pth", model="organs")
    assert loads == [] and cache.stats()["loading"] == 0 and cache.failures() == {}
    assert str(tmp_path) not in str(e.value)


def test_failed_loads_leave_a_bounded_record_and_fail_fast(tmp_path):
    """Each failing load of a distinct checkpoint leaves no lock behind and at most MAX_FAILED records; the same
    failure is answered at once (no reload) until FAILED_RETRY_S has passed or /expire forgets it."""
    names = ["broken_%d.pth" % i for i in range(PredictorCache.MAX_FAILED + 10)]
    m = result_folders(tmp_path, names=("a",), folds=("0",), checkpoints=names + ["checkpoint_final.pth"])
    loads = []
    clock = Clock()

    def loader(folder, folds, ckpt):
        loads.append(ckpt)
        if ckpt.startswith("broken"):
            raise RuntimeError("Weights only load failed: %s/fold_0/%s is not a checkpoint" % (folder, ckpt))
        return object()

    cache = PredictorCache("cpu", loader=loader, clock=clock)
    for name in names:
        with pytest.raises(R.ModelUnavailable) as e:
            cache.get(m["a"], [0], name, model="organs")
    assert e.value.status == 503
    assert str(e.value) == ("model 'organs' cannot be loaded on this server (folds 0, %s: RuntimeError: Weights only "
                            "load failed: %s is not a checkpoint); its files need the operator's attention (the "
                            "server log has the details), or choose other folds or another checkpoint_name"
                            % (names[-1], names[-1]))
    stats = cache.stats()
    assert stats["loading"] == 0 and stats["size"] == 0 and stats["load_failures"] == len(names)
    assert stats["failed_remembered"] == PredictorCache.MAX_FAILED  # the oldest were dropped
    with pytest.raises(R.ModelUnavailable):
        cache.get(m["a"], [0], names[-1], model="organs")
    assert len(loads) == len(names)  # answered from the record, not loaded again
    clock.now = PredictorCache.FAILED_RETRY_S
    with pytest.raises(R.ModelUnavailable):
        cache.get(m["a"], [0], names[-1], model="organs")
    assert len(loads) == len(names) + 1  # tried again after the retry time
    assert cache.get(m["a"], [0], "checkpoint_final.pth") is not None  # the model's good checkpoint still loads
    cache.expire()
    assert cache.failures() == {} and cache.stats()["failed_remembered"] == 0


def test_waiters_of_a_failing_load_share_its_failure(tmp_path):
    m = result_folders(tmp_path, names=("a",), folds=("0",))
    gate, loads, errors = threading.Event(), [], []

    def loader(folder, folds, ckpt):
        loads.append(ckpt)
        gate.wait(5)
        raise ValueError("broken")

    cache = PredictorCache("cpu", loader=loader)

    def get():
        try:
            cache.get(m["a"], [0], "checkpoint_final.pth", model="organs")
        except R.ModelUnavailable as exc:
            errors.append(exc)

    threads = [threading.Thread(target=get) for _ in range(4)]
    for t in threads:
        t.start()
    for _ in range(500):
        if cache.stats()["loading"] == 1 and loads:
            break
        threading.Event().wait(0.01)
    gate.set()
    for t in threads:
        t.join(10)
    assert len(loads) == 1 and len(errors) == 4 and cache.stats()["loading"] == 0


def test_threshold_components():
    p = np.zeros((20, 20, 20), np.float32)
    p[2:6, 2:6, 2:6] = 0.6    # 64 voxels, peak 0.6
    p[10:14, 10:14, 10:14] = 0.3  # 64 voxels, peak 0.3
    p[10, 10, 10] = 0.35
    p[17:19, 17:19, 17:19] = 0.9  # 8 voxels: too small
    p[0, 19, 0] = 0.05        # below the threshold
    kept = threshold_components(p, 0.1, None)
    assert (kept[2:6, 2:6, 2:6] == 0.6).all() and (kept[10:14, 10:14, 10:14] > 0).all()
    assert kept[17:19, 17:19, 17:19].max() == 0 and kept[0, 19, 0] == 0
    kept = threshold_components(p, 0.1, 0.5)  # the second blob never reaches 0.5
    assert kept[10:14, 10:14, 10:14].max() == 0 and kept[2:6, 2:6, 2:6].min() == 0.6


# ---------------------------------------------------------------------------------------------------------- predictors

class CountingQueue(DeviceQueue):
    """The server's prediction queue (a real one, its own thread), counting the automatic runs it was given."""

    def __init__(self):
        super().__init__(name="test-queue")
        self.runs = []

    def run_pieces(self, steps, **kw):
        out, run = super().run_pieces(steps, **kw)
        self.runs.append(run)
        return out, run


@pytest.fixture(scope="module")
def seg(reg):
    import torch

    torch.set_num_threads(2)
    return AutoSegmenter(reg, device="cpu", queue=CountingQueue())


@pytest.fixture(scope="module")
def image():
    rng = np.random.RandomState(0)
    return rng.rand(1, 64, 64, 64).astype(np.float32)


@pytest.fixture(scope="module")
def full(seg, image):
    return seg.predict("organs", image, (1.0, 1.0, 1.0), probabilities=True)


def test_predict_shape_labels_and_queue(seg, image, full):
    r = full
    assert r.model_id == "organs_ct" and r.labels.shape == (64, 64, 64) and r.labels.dtype == np.uint8
    assert set(np.unique(r.labels)) <= {0, 1, 2} and len(np.unique(r.labels)) > 1
    assert r.probabilities.shape == (3, 64, 64, 64)
    assert (r.probabilities.argmax(0) == r.labels).all()
    assert [s.name for s in r.segments] == ["liver", "spleen"]
    # a 64^3 image, a 64^3 patch: the fold's start, one tile, its end; the export class by class, the probabilities'
    # one slab, the end
    run = seg.queue.runs[0]
    assert run.done + 1 == run.expected == (1 + 1 + 1) + 3 + 1 + 1 and run.ran["predict"] > 0 and run.ran["export"] > 0
    assert r.timings["queue"] == run.waited and r.timings["predict"] == run.ran["predict"]
    again = seg.predict("organs_ct", image, (1.0, 1.0, 1.0))
    assert again.timings["load"] == 0.0 and again.probabilities is None  # a cache hit; no map unless asked
    assert (again.labels == r.labels).all()


def test_predict_anisotropic_shape(seg):
    img = np.random.RandomState(1).rand(1, 20, 48, 40).astype(np.float32)
    r = seg.predict("organs", img, (3.0, 0.8, 0.8))
    assert r.labels.shape == (20, 48, 40)


def test_class_subset(seg, image, full):
    r = seg.predict("organs", image, (1.0, 1.0, 1.0), class_idx=2)
    p = full.probabilities
    assert set(np.unique(r.labels)) <= {0, 2} and [s.name for s in r.segments] == ["spleen"]
    assert (r.labels == np.where(p[2] > p[0], 2, 0)).mean() > 0.999  # softmax over background + spleen only


def test_probability_threshold(seg, image, full):
    r = seg.predict("organs", image, (1.0, 1.0, 1.0), class_idx=[2], proba_threshold=0.3, min_confidence=0.6)
    assert r.probabilities.shape == (1, 64, 64, 64) and set(np.unique(r.labels)) <= {0, 2}
    assert ((r.probabilities[0] > 0.3) == (r.labels == 2)).all()
    p = full.probabilities
    expected = threshold_components(p[2] / (p[0] + p[2]), 0.3, 0.6)
    assert np.mean((expected > 0.3) == (r.labels == 2)) > 0.999
    # the lesion model's defaults (threshold 0.1, min_confidence 0.5, class 1, save_proba_map) apply unless overridden
    lesion = seg.predict("lesion_ct", image, (1.0, 1.0, 1.0))
    assert lesion.args["proba_threshold"] == 0.1 and lesion.args["class_idx"] == [1]
    assert lesion.probabilities is not None and set(np.unique(lesion.labels)) <= {0, 1}
    assert [s.name for s in lesion.segments] == ["Neoplasm"]
    plain = seg.predict("lesion_ct", image, (1.0, 1.0, 1.0), proba_threshold=None, class_idx=None,
                        save_proba_map=False)
    assert plain.probabilities is None and set(np.unique(plain.labels)) <= {0, 1, 2}


def test_tta(seg, image, full):
    r = seg.predict("organs", image, (1.0, 1.0, 1.0), tta=True)
    assert r.args["tta"] is True and r.labels.shape == full.labels.shape
    assert seg.cache.get(seg.registry.result_folder("organs"), [0], "checkpoint_final.pth").predictor.use_mirroring


def test_bad_requests(seg, image):
    with pytest.raises(BadInput, match="expects 1 image channel"):
        seg.predict("organs", np.zeros((2, 8, 8, 8), np.float32), (1, 1, 1))
    with pytest.raises(BadInput, match=r"class_idx \[5\]: model 'organs_ct' has no such label \(its labels: \[1, 2\]\)"):
        seg.predict("organs", image, (1, 1, 1), class_idx=5)
    with pytest.raises(BadInput, match="'tta' must be true or false"):
        seg.predict("organs", image, (1, 1, 1), tta="yes")
    with pytest.raises(R.UnknownModel, match="known model ids: organs_ct, lesion_ct, total_fast_ct"):
        seg.predict("liver", image, (1, 1, 1))
    with pytest.raises(R.ModelUnavailable, match=r"totalsegmentator\]"):
        seg.predict("total_fast_ct", image, (1, 1, 1))
