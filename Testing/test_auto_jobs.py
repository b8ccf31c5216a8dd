"""Jobs a department can rely on, on real server processes with the tiny nnU-Net model (issue 15 point 3):

* ``POST /jobs`` (an upload, or a study on server paths) answers 202 with the job at once; ``GET /jobs/{id}``
  follows it (queued, running with progress, done with the established result); ``/download`` serves an upload's
  outputs; only its owner sees, deletes or downloads a job;
* an upload takes no job, and no share of anyone's, until it has arrived: it is spooled under ``--jobs-dir`` (never
  the system's temporary folder) while it arrives;
* shares per user: jobs kept (429), bytes in the jobs folder (413 / 429), all jobs (503);
* ``DELETE`` cancels a queued job at once and a running one at its next piece (a cascade's stage), with its files;
  a synchronous /infer whose client goes away is cancelled the same way; the runner starts the oldest job of the
  user with the fewest running;
* a draining server (SIGTERM) refuses new automatic work with 503 + Retry-After, fails the queued jobs, waits for the
  running ones (or, at its deadline, cancels them and marks them failed); jobs and their outputs survive a restart.

"Long" runs are cascades of many stages of the tiny model on a small image: each stage is a piece that takes a
fraction of a second, so a job seen at its first stages is still running many pieces later, and a cancelled one
stops within one.
"""

import io
import json
import os
import signal
import socket
import sys
import time
import zipfile
from urllib.parse import urlsplit

import pytest
import requests

import tiny_nnunet
from conftest import SERVER_ENV, TORCH_THREADS, free_port, running
from test_auto_endpoints import SPACING, make_image, zip_bytes

USERS = ("alice", "bob", "carol")
LONG = 40  # stages of a long job (a stage of the tiny model takes a fraction of a second to a second here)
DRAINED = 6  # stages of the job a draining server waits for
UPLOAD_LIMIT = 4 << 20
BYTES_PER_USER = 3 << 20  # below the upload limit: an upload can exceed a user's share alone
JOBS, JOBS_PER_USER = 7, 3


def write_keys(path):
    from nninteractive_slicer_server.identities import hash_token

    tokens = {name: "%s.token-of-%s-0123456789" % (name, name) for name in USERS}
    with open(path, "w") as f:
        for name, token in tokens.items():
            f.write("%s:%s\n" % (name, hash_token(token, "pbkdf2_sha256")))
    os.chmod(path, 0o600)
    return tokens


def make_world(root):
    import SimpleITK as sitk

    models, allowed = root / "models", root / "allowed"
    tiny_nnunet.make_tiny_nnunet(str(models))
    spec = tiny_nnunet.write_spec(str(root / "model-serve-spec.yaml"), str(models))
    (allowed / "study1").mkdir(parents=True)
    volume = sitk.GetImageFromArray(make_image()[0])
    volume.SetSpacing(SPACING[::-1])
    sitk.WriteImage(volume, str(allowed / "study1" / "ct.nii.gz"))
    with open(str(allowed / "study1" / "ct.nii.gz"), "rb") as f:
        study = zip_bytes([("ct.nii.gz", f.read())])
    return spec, str(allowed), study, write_keys(str(root / "users.keys"))


def server_cmd(port, spec, root, jobs, allowed, model, *flags):
    return [sys.executable, "-m", "nninteractive_slicer_server", "--model-dir", model, "--device", "cpu",
            "--port", str(port), "--torch-n-threads", TORCH_THREADS, "--model-serve-spec", spec,
            "--infer-root", allowed, "--jobs-dir", jobs, "--keys-file", str(root / "users.keys"),
            "--max-running-jobs", "1", *flags]


class World:
    def __init__(self, url, root, allowed, jobs, study, tokens, log, tmpdir=None, proc=None):
        self.url, self.root, self.allowed, self.jobs, self.study = url, root, allowed, jobs, study
        self.tokens, self.log, self.tmpdir, self.proc = tokens, log, tmpdir, proc

    def call(self, method, path, user="alice", **kw):
        headers = dict(kw.pop("headers", {}), Authorization="Bearer " + self.tokens[user])
        return requests.request(method, self.url + path, headers=headers, timeout=120, **kw)

    def post_upload(self, user="alice", archive=None, request=None, path="/jobs"):
        request = request or {"nnunet_id": "tiny_organs", "series_folders": ["ct.nii.gz"]}
        return self.call("POST", path, user, files={"file": ("study.zip", archive or self.study)},
                         data={"request": json.dumps(request)})

    def paths_request(self, stages=1, out="out"):
        return {"nnunet_id": ["tiny_organs"] * stages if stages > 1 else "tiny_organs",
                "study_path": os.path.join(self.allowed, "study1"), "series_folders": ["ct.nii.gz"],
                "output_dir": os.path.join(self.allowed, out)}

    def post_paths(self, user="alice", stages=1, out="out"):
        return self.call("POST", "/jobs", user, json=self.paths_request(stages, out))

    def status(self, job_id, user="alice"):
        return self.call("GET", "/jobs/%s" % job_id, user)

    def wait(self, job_id, until, user="alice", timeout=300):
        """Poll the job until ``until(body)`` (or it ended); returns the last body."""
        deadline = time.monotonic() + timeout
        while True:
            r = self.status(job_id, user)
            assert r.status_code == 200, r.text
            body = r.json()
            if until(body) or body["status"] in ("done", "failed"):
                return body
            assert time.monotonic() < deadline, "job %s stayed %s" % (job_id, body)
            time.sleep(0.05)

    def wait_gone(self, job_id, user="alice", timeout=120):
        deadline = time.monotonic() + timeout
        while self.status(job_id, user).status_code != 404:
            assert time.monotonic() < deadline, "job %s was not removed" % job_id
            time.sleep(0.05)

    def log_text(self):
        with open(self.log) as f:
            return f.read()


def at_stage(n):
    """The job runs and has reached stage ``n`` of its cascade."""
    return lambda body: body["status"] == "running" and "stage %d/" % n in ((body.get("progress") or {})
                                                                            .get("message") or "")


@pytest.fixture(scope="module")
def world(tmp_path_factory, quiet_model):
    root = tmp_path_factory.mktemp("auto-jobs")
    spec, allowed, study, tokens = make_world(root)
    jobs, tmpdir = root / "jobs", root / "tmp"
    jobs.mkdir()
    tmpdir.mkdir()
    port = free_port()
    url = "http://127.0.0.1:%d" % port
    cmd = server_cmd(port, spec, root, str(jobs), allowed, quiet_model, "--max-upload-bytes", str(UPLOAD_LIMIT),
                     "--max-jobs", str(JOBS), "--max-jobs-per-user", str(JOBS_PER_USER),
                     "--max-job-bytes-per-user", str(BYTES_PER_USER), "--liveness-timeout-seconds", "60")
    log = str(root / "server.log")
    env = dict(SERVER_ENV, TMPDIR=str(tmpdir))  # the system's temporary folder, as the server sees it
    with running(cmd, url, log, env=env) as proc:
        yield World(url, root, allowed, str(jobs), study, tokens, log, str(tmpdir), proc)


@pytest.fixture
def clean(world):
    """Every user's jobs deleted after the test (the shares are the module's)."""
    yield
    for user in USERS:
        for job in world.call("GET", "/jobs", user).json()["jobs"]:
            world.call("DELETE", "/jobs/%s" % job["job_id"], user)
    for user in USERS:
        deadline = time.monotonic() + 120
        while world.call("GET", "/jobs", user).json()["jobs"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def job_folders(world):
    return sorted(d for d in os.listdir(world.jobs) if d != ".spool")


# ---------------------------------------------------------------------------------------------------------- jobs

def test_an_uploaded_job_answers_at_once_then_status_result_and_download(world, clean):
    r = world.post_upload()
    assert r.status_code == 202, r.text
    body = r.json()
    job_id = body["job_id"]
    assert len(job_id) == 32 and body["status"] in ("queued", "running") and body["kind"] == "upload"
    assert r.headers["location"] == "/jobs/%s" % job_id
    assert body["request"] == {"nnunet_id": "tiny_organs", "series_folders": ["ct.nii.gz"]}
    done = world.wait(job_id, lambda b: False)
    assert done["status"] == "done", done
    result = done["result"]
    assert result["status"] == "done" and result["nifti_prediction"] == ["output/stage_0/prediction.nii.gz"]
    assert result["is_empty"] == [False] and done["download"] == "/download/%s" % job_id
    assert world.jobs not in json.dumps(done) and done["finished"] >= done["started"] >= done["created"]
    z = world.call("GET", "/download/%s" % job_id)
    assert z.status_code == 200
    with zipfile.ZipFile(io.BytesIO(z.content)) as zf:
        assert zf.namelist() == ["output/stage_0/prediction.nii.gz"]
        from_job = zf.read("output/stage_0/prediction.nii.gz")
    wait_for(lambda: sorted(os.listdir(os.path.join(world.jobs, job_id))) == ["job.json", "outputs.zip"])
    # the synchronous answer of /infer_file: the same outputs, the established fields and the job id
    r = world.post_upload(path="/infer_file")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "done" and len(r.json()["job_id"]) == 32
    z = world.call("GET", "/download/%s" % r.json()["job_id"])
    with zipfile.ZipFile(io.BytesIO(z.content)) as zf:
        assert zf.read("output/stage_0/prediction.nii.gz") == from_job


def test_a_job_on_server_paths(world, clean):
    r = world.post_paths(out="paths_job")
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    assert r.json()["kind"] == "paths"
    done = world.wait(job_id, lambda b: False)
    written = os.path.join(world.allowed, "paths_job", "stage_0", "prediction.nii.gz")
    assert done["status"] == "done" and done["result"]["nifti_prediction"] == [written] and os.path.isfile(written)
    assert "download" not in done
    assert world.call("GET", "/download/%s" % job_id).status_code == 404  # its outputs are on the server's paths
    wait_for(lambda: os.listdir(os.path.join(world.jobs, job_id)) == ["job.json"])
    r = world.call("POST", "/jobs", json=dict(world.paths_request(), output_dir="/tmp/elsewhere"))
    assert r.status_code == 403 and "--infer-root" in r.json()["detail"]
    r = world.call("POST", "/jobs", json=dict(world.paths_request(), nnunet_id="nope"))
    assert r.status_code == 400 and "tiny_organs" in r.json()["detail"]


def test_a_job_is_its_owners_alone(world, clean):
    job_id = world.post_upload(user="alice").json()["job_id"]
    world.wait(job_id, lambda b: False)
    for method, path in (("GET", "/jobs/%s"), ("DELETE", "/jobs/%s"), ("GET", "/download/%s")):
        r = world.call(method, path % job_id, user="bob")
        assert r.status_code == 404, r.text
        assert "unknown" in r.json()["detail"]
    assert [j["job_id"] for j in world.call("GET", "/jobs", "bob").json()["jobs"]] == []
    assert [j["job_id"] for j in world.call("GET", "/jobs", "alice").json()["jobs"]] == [job_id]
    assert world.status(job_id).json()["status"] == "done"  # bob's DELETE did nothing
    for bad in ("0" * 32, "../../etc/passwd", "x" * 300):
        assert world.status(bad).status_code == 404
    r = world.call("DELETE", "/jobs/%s" % job_id)
    assert r.status_code == 200 and r.json() == {"job_id": job_id, "status": "deleted"}
    assert world.status(job_id).status_code == 404 and job_id not in job_folders(world)


def test_a_failed_job_keeps_its_error_until_deleted(world, clean):
    r = world.post_upload(archive=zip_bytes([("../evil.txt", b"owned")]))
    assert r.status_code == 202, r.text  # unpacked by the job, within the run limit
    job_id = r.json()["job_id"]
    failed = world.wait(job_id, lambda b: False)
    assert failed["status"] == "failed" and failed["error_status"] == 400 and "climbs out" in failed["error"]
    wait_for(lambda: os.listdir(os.path.join(world.jobs, job_id)) == ["job.json"])  # its files are gone
    r = world.post_upload(archive=b"not an archive at all")
    assert r.status_code == 400 and "not a zip or tar" in r.json()["detail"]  # refused before any job exists
    assert len(world.call("GET", "/jobs").json()["jobs"]) == 1


# ---------------------------------------------------------------------------------------------------------- uploads

HELD = 1200000  # what a held upload sends of its file (more than the server keeps in memory before writing)


def start_upload(world, user="alice", sent=HELD, declared=HELD + 100000):
    """A multipart upload that sends the beginning of its file and then nothing: its socket."""
    boundary = "held-upload-boundary"
    head = ("--%s\r\nContent-Disposition: form-data; name=\"file\"; filename=\"study.zip\"\r\n"
            "Content-Type: application/zip\r\n\r\n" % boundary).encode()
    port = urlsplit(world.url).port
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(("POST /jobs HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAuthorization: Bearer %s\r\n"
               "Content-Type: multipart/form-data; boundary=%s\r\nContent-Length: %d\r\n\r\n"
               % (port, world.tokens[user], boundary, len(head) + declared)).encode() + head + bytes(sent))
    return s


def spooled(world):
    folder = os.path.join(world.jobs, ".spool")
    return {name: os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder)}


def wait_for(predicate, timeout=60):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_uploads_in_progress_take_no_job_and_spool_under_the_jobs_folder(world, clean):
    held = [start_upload(world) for _ in range(2)]
    try:
        wait_for(lambda: len(spooled(world)) == 2 and min(spooled(world).values()) >= 1 << 20)
        # nothing in the system's temporary folder (torch keeps a cache folder of its own there)
        assert [n for n in os.listdir(world.tmpdir) if not n.startswith("torchinductor")] == []
        assert world.call("GET", "/jobs").json()["jobs"] == []
        assert world.call("GET", "/readyz").json()["jobs"]["kept"] == 0
        # the bytes the held uploads sent count against their user's share...
        r = world.post_upload(archive=bytes(1 << 20))
        assert r.status_code == 429 and "--max-job-bytes-per-user" in r.json()["detail"]
        # ...but they take no job: the user's whole job share is free
        ids = []
        for _ in range(JOBS_PER_USER):
            r = world.post_upload()
            assert r.status_code == 202, r.text
            ids.append(r.json()["job_id"])
    finally:
        for s in held:
            s.close()
    wait_for(lambda: spooled(world) == {})  # a client that goes away leaves nothing
    for job_id in ids:
        assert world.wait(job_id, lambda b: False)["status"] == "done"


def test_upload_limits_and_shares(world, clean):
    r = world.post_upload(archive=bytes(UPLOAD_LIMIT + 1))
    assert r.status_code == 413 and "--max-upload-bytes" in r.json()["detail"]
    r = world.post_upload(archive=bytes(BYTES_PER_USER + 1024))  # within the upload limit, not the user's share
    assert r.status_code == 413 and "--max-job-bytes-per-user" in r.json()["detail"]

    def chunks():  # no Content-Length: the user's share is counted as the file arrives
        yield (b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.zip"\r\n'
               b"Content-Type: application/octet-stream\r\n\r\n")
        for _ in range(8):
            yield bytes(UPLOAD_LIMIT // 8)

    r = world.call("POST", "/jobs", data=chunks(), headers={"Content-Type": "multipart/form-data; boundary=xyz"})
    assert r.status_code == 413 and "--max-job-bytes-per-user" in r.json()["detail"]
    r = world.call("POST", "/jobs", data=b"{}", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "nnunet_id" in r.json()["detail"]
    r = world.call("POST", "/jobs", files={"file": ("a.zip", world.study)})
    assert r.status_code == 400 and "'request'" in r.json()["detail"]
    assert spooled(world) == {} and job_folders(world) == []

    # jobs kept per user (429), then all jobs (503)
    ids = {u: [] for u in USERS}
    for user in ("alice", "bob"):
        for _ in range(JOBS_PER_USER):
            r = world.post_upload(user)
            assert r.status_code == 202, r.text
            ids[user].append(r.json()["job_id"])
    r = world.post_upload("alice")
    assert r.status_code == 429 and "--max-jobs-per-user" in r.json()["detail"] and "DELETE" in r.json()["detail"]
    r = world.post_upload("carol")
    assert r.status_code == 202, r.text
    r = world.post_upload("carol")
    assert r.status_code == 503 and "--max-jobs" in r.json()["detail"] and r.headers["retry-after"]
    for job_id in ids["alice"]:
        world.wait(job_id, lambda b: False)
    assert world.call("DELETE", "/jobs/%s" % ids["alice"][0]).json()["status"] == "deleted"
    r = world.post_upload("alice")
    assert r.status_code == 202, r.text


# ---------------------------------------------------------------------------------------------------------- cancel

def test_delete_cancels_queued_and_running_jobs_and_the_runner_is_fair(world, clean):
    long_job = world.post_paths("alice", stages=LONG, out="long").json()["job_id"]
    world.wait(long_job, at_stage(2))
    second = world.post_upload("alice").json()["job_id"]
    bob = world.post_upload("bob").json()["job_id"]
    queued = world.status(second).json()
    assert queued["status"] == "queued" and queued["queue"] == {"ahead": 1, "running": 1, "workers": 1}
    assert world.status(bob, "bob").json()["queue"]["ahead"] == 0  # alice runs one already: bob goes first
    assert os.path.isdir(os.path.join(world.jobs, second))

    r = world.call("DELETE", "/jobs/%s" % second)
    assert r.status_code == 200 and r.json() == {"job_id": second, "status": "cancelled"}
    assert world.status(second).status_code == 404 and second not in job_folders(world)
    assert world.status(bob, "bob").json()["queue"]["ahead"] == 0

    r = world.call("DELETE", "/jobs/%s" % long_job)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"  # it was running
    world.wait_gone(long_job)
    assert long_job not in job_folders(world)
    written = os.listdir(os.path.join(world.allowed, "long"))
    assert 1 <= len(written) < LONG  # stopped between its pieces (stage 2 was running), long before its last stage
    assert "job %s cancelled (deleted by its owner)" % long_job in world.log_text()
    assert world.wait(bob, lambda b: False, "bob")["status"] == "done"  # the runner goes on


def raw_infer(world, body, user="alice"):
    port = urlsplit(world.url).port
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(("POST /infer HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAuthorization: Bearer %s\r\n"
               "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
               % (port, world.tokens[user], len(data))).encode() + data)
    return s


def test_a_synchronous_run_whose_client_goes_away_is_cancelled(world, clean):
    s = raw_infer(world, world.paths_request(LONG, "gone"))
    out = os.path.join(world.allowed, "gone")
    try:
        wait_for(lambda: os.path.isdir(out) and len(os.listdir(out)) >= 2)
    finally:
        s.close()
    wait_for(lambda: world.call("GET", "/readyz").json()["runs"]["running"] == 0, timeout=120)
    assert "went away; the job is cancelled" in world.log_text()
    assert len(os.listdir(out)) < LONG
    r = world.call("POST", "/infer", json=world.paths_request(1, "sync"))  # and the next one runs
    assert r.status_code == 200 and r.json()["status"] == "done"


# ---------------------------------------------------------------------------------------------------------- restart

def test_the_index_of_an_unfinished_job_reads_back_as_failed(tmp_path):
    """A server killed (no drain) leaves queued and running jobs: the next start marks them failed, saying why, and
    removes what is not a job of the server (a half-made folder, an upload being received)."""
    from nninteractive_slicer_server.auto.jobs import RESTARTED, JobStore
    from nninteractive_slicer_server.limits import Limits

    limits = Limits.defaults(memory_budget=1 << 30)
    store = JobStore(str(tmp_path), limits)
    done, running_job = store.create("alice", "paths", {"a": 1}), store.create("bob", "upload", {})
    done.status, done.result = "done", {"status": "done"}
    store.save(done)
    running_job.status = "running"
    store.save(running_job)
    with open(running_job.upload, "wb") as f:
        f.write(b"archive")
    os.makedirs(str(tmp_path / ("f" * 32)))  # a job folder without an index
    with open(os.path.join(store.spool, "partial"), "wb") as f:
        f.write(b"upload")
    again = JobStore(str(tmp_path), limits)
    assert again.reloaded == 2 and sorted(os.listdir(str(tmp_path))) == sorted([".spool", done.id, running_job.id])
    assert again.find(done.id, "alice").result == {"status": "done"}
    back = again.find(running_job.id, "bob")
    assert back.status == "failed" and back.error == RESTARTED and back.error_status == 503
    assert os.listdir(running_job.folder) == ["job.json"] and os.listdir(again.spool) == []
    with pytest.raises(Exception, match="unknown"):
        again.find(done.id, "bob")


def test_drain_restart_and_the_deadline(world, quiet_model):
    """SIGTERM: new automatic work gets 503 + Retry-After, queued jobs fail, the running one is waited for; after a
    restart on the same --jobs-dir the jobs are there (outputs downloadable). A job still running at a short
    deadline is cancelled and its index says failed. (The module's server is the first one: this test ends it, so
    it comes last.)"""
    spec, allowed, jobs, study, tokens = (str(world.root / "model-serve-spec.yaml"), world.allowed, world.jobs,
                                          world.study, world.tokens)
    proc, w = world.proc, world
    done = w.post_upload().json()["job_id"]
    assert w.wait(done, lambda b: False)["status"] == "done"
    long_job = w.post_paths(stages=DRAINED, out="drained").json()["job_id"]
    w.wait(long_job, at_stage(1))
    queued = w.post_upload().json()["job_id"]
    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: requests.get(w.url + "/healthz", timeout=5).status_code == 503)
    for r in (w.post_upload(), w.post_paths(), w.post_upload(path="/infer_file"),
              w.call("POST", "/infer", json=w.paths_request())):
        assert r.status_code == 503 and "shutting down" in r.json()["detail"] and r.headers["retry-after"]
    assert proc.wait(120) == 0
    assert "SIGTERM" in w.log_text()

    def start(deadline, name):
        port = free_port()
        url = "http://127.0.0.1:%d" % port
        cmd = server_cmd(port, spec, world.root, jobs, allowed, quiet_model, "--shutdown-deadline-seconds",
                         str(deadline))
        log = str(world.root / ("%s.log" % name))
        return running(cmd, url, log), World(url, world.root, allowed, jobs, study, tokens, log)

    ctx, w = start(4, "second")
    with ctx as proc:
        assert w.status(done).json()["status"] == "done"
        z = w.call("GET", "/download/%s" % done)
        assert z.status_code == 200 and zipfile.ZipFile(io.BytesIO(z.content)).namelist() == [
            "output/stage_0/prediction.nii.gz"]
        drained = w.status(long_job).json()
        assert drained["status"] == "done", drained  # the shutdown waited for it
        assert len(drained["result"]["nifti_prediction"]) == DRAINED
        failed = w.status(queued).json()
        assert failed["status"] == "failed" and failed["error_status"] == 503
        assert "shutting down before this job started" in failed["error"]
        assert os.listdir(os.path.join(jobs, queued)) == ["job.json"]

        cut = w.post_paths(stages=LONG * 4, out="cut").json()["job_id"]
        w.wait(cut, at_stage(1))
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    with open(os.path.join(jobs, cut, "job.json")) as f:
        index = json.load(f)
    assert index["status"] == "failed" and "shut down before the job finished" in index["error"]
    assert len(os.listdir(os.path.join(allowed, "cut"))) < LONG * 4
