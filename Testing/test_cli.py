"""Start-up failures end with one sentence saying what to do, never a traceback."""

import os
import shutil
import subprocess
import sys

import pytest

import requests

from conftest import SERVER_ENV, free_port, running


def run(*args, env=None):
    cmd = [sys.executable, "-m", "nninteractive_slicer_server", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env or SERVER_ENV, timeout=180)
    return p.returncode, p.stderr


def assert_one_clear_sentence(rc, err, *words):
    assert rc == 2, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("nninteractive-slicer-server"), err
    for w in words:
        assert w in last, last


def test_cuda_asked_without_a_gpu(quiet_model):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    rc, err = run("--model-dir", quiet_model)  # --device cuda is the default
    assert_one_clear_sentence(rc, err, "CUDA", "--device cpu")


def test_model_folder_missing_a_file(quiet_model, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(quiet_model, broken)
    os.remove(broken / "plans.json")
    rc, err = run("--model-dir", str(broken), "--device", "cpu")
    assert_one_clear_sentence(rc, err, "plans.json")
    os.remove(broken / "fold_0" / "checkpoint_final.pth")
    shutil.copy(os.path.join(quiet_model, "plans.json"), broken / "plans.json")
    rc, err = run("--model-dir", str(broken), "--device", "cpu")
    assert_one_clear_sentence(rc, err, "checkpoint_final.pth")
    rc, err = run("--model-dir", str(tmp_path / "nowhere"), "--device", "cpu")
    assert_one_clear_sentence(rc, err, "does not exist")


def test_fold_detection(quiet_model, tmp_path):
    two = tmp_path / "two"
    shutil.copytree(quiet_model, two)
    shutil.copytree(two / "fold_0", two / "fold_1")
    rc, err = run("--model-dir", str(two), "--device", "cpu")
    assert_one_clear_sentence(rc, err, "--fold")
    rc, err = run("--model-dir", str(two), "--device", "cpu", "--fold", "3")
    assert_one_clear_sentence(rc, err, "fold_3")


def test_download_impossible(tmp_path):
    env = dict(SERVER_ENV, NNINTERACTIVE_MODEL_DIR=str(tmp_path), HF_HUB_OFFLINE="1")
    rc, err = run("--model", "nnInteractive_v1.0", "--device", "cpu", env=env)
    assert_one_clear_sentence(rc, err, "--model-dir")
    p = subprocess.run([sys.executable, "-c", "from nninteractive_slicer_server.cli import download_main; "
                        "raise SystemExit(download_main([]))"], capture_output=True, text=True, env=env)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "--model-dir" in p.stderr


def test_a_downloaded_model_starts_without_network(quiet_model, tmp_path):
    # where the official downloader keeps a model: $NNINTERACTIVE_MODEL_DIR/models/<id>/
    shutil.copytree(quiet_model, str(tmp_path / "root" / "models" / "nnInteractive_v1.0"))
    env = dict(SERVER_ENV, NNINTERACTIVE_MODEL_DIR=str(tmp_path / "root"), HF_HUB_OFFLINE="1")
    port = free_port()
    url = "http://127.0.0.1:%d" % port
    cmd = [sys.executable, "-m", "nninteractive_slicer_server", "--model", "nnInteractive_v1.0", "--device", "cpu",
           "--port", str(port)]
    with running(cmd, url, str(tmp_path / "server.log"), env=env):
        info = requests.get(url + "/x/info", timeout=10).json()
    assert info["model"] == "nnInteractive_v1.0", info


def test_conflicting_flags(quiet_model):
    rc, err = run("--model-dir", quiet_model, "--model", "x", "--device", "cpu")
    assert_one_clear_sentence(rc, err, "not both")
    rc, err = run("--model-dir", quiet_model, "--device", "cpu", "--max-sessions", "0")
    assert_one_clear_sentence(rc, err, "--max-sessions")
    rc, err = run("--model-dir", quiet_model, "--device", "cpu", "--max-running-jobs", "0")
    assert_one_clear_sentence(rc, err, "--max-running-jobs")
    rc, err = run("--model-dir", quiet_model, "--device", "cpu", "--max-jobs-per-user", "0")
    assert_one_clear_sentence(rc, err, "--max-jobs-per-user")
