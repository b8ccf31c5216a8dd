"""Names of nnInteractive 2.6's remote protocol (paths and headers), and of our own additions.

Both our server and our client import these, so a path is spelled once.
Our own endpoints live under ``/x/`` so that they can never collide with the official protocol.
"""

import functools

META_HEADER = "X-Meta"  # JSON beside a binary body (requests) or a packed array (responses)
LEASE_HEADER = "X-Lease-Token"
OCTET_STREAM = "application/octet-stream"

PATH_HEALTHZ = "/healthz"
PATH_CAPABILITIES = "/capabilities"
PATH_CLAIM = "/claim"
PATH_RELEASE = "/release"
PATH_HEARTBEAT = "/heartbeat"
PATH_LEASE_STATUS = "/lease_status"
PATH_SET_IMAGE = "/set_image"
PATH_SET_TARGET_BUFFER = "/set_target_buffer"
PATH_SET_DO_AUTOZOOM = "/set_do_autozoom"
PATH_RESET_INTERACTIONS = "/reset_interactions"
PATH_UNDO = "/undo"
PATH_PREDICT = "/predict"
PATH_ADD_POINT = "/add_point_interaction"
PATH_ADD_BBOX = "/add_bbox_interaction"
PATH_ADD_SCRIBBLE = "/add_scribble_interaction"
PATH_ADD_LASSO = "/add_lasso_interaction"
PATH_ADD_INITIAL_SEG = "/add_initial_seg_interaction"

# Our additions (never used by the official client).
PATH_SERVER_INFO = "/x/info"  # version, model, license, device, sessions, memory, machine
PATH_QUEUE = "/x/queue"  # the lease's place in the GPU queue: ahead, expected_wait_seconds, running, waiting
PATH_METRICS = "/metrics"  # Prometheus text format (behind the key); not in the official protocol
TIMING_HEADER = "X-NNI-Timing"  # per-phase server timings in ms, JSON; ignored by official clients
PATH_AUTO_SEGMENT = "/x/auto_segment"  # run a registered nnU-Net model on the session's image
PATH_AUTO_CANCEL = "/x/auto_segment/cancel"  # stop the lease's automatic run in progress (between its pieces)

# The established nnU-Net model server's endpoints (automatic models), served as that server serves them.
PATH_MODEL_INFO = "/model_info"
PATH_MODEL_INFO_CLEAN = "/model_info_clean"  # each model's segments as "Label ID" / "Name" / "Index", descriptions
PATH_REQUEST_PARAMS = "/request-params"
PATH_READYZ = "/readyz"
PATH_INFER = "/infer"
PATH_INFER_FILE = "/infer_file"
PATH_DOWNLOAD = "/download/{job_id}"
PATH_EXPIRE = "/expire"
PATH_INFER_ORTHANC = "/infer_orthanc"  # series fetched from the operator's Orthanc, DICOM SEG pushed back to it
PATH_JOBS = "/jobs"  # ours: POST a study -> 202 {job_id}; GET /jobs/{job_id} status; DELETE cancels
PATH_JOB = "/jobs/{job_id}"


@functools.lru_cache(maxsize=None)
def machine_id():
    """An opaque name of this computer (host name and hardware address, hashed). Our server reports it in
    /x/info, so a client on a loopback URL can tell a server on this computer from one reached through an SSH
    tunnel (also a loopback URL, but with a network behind it)."""
    import hashlib
    import socket
    import uuid

    return hashlib.sha256(("%s|%012x" % (socket.gethostname(), uuid.getnode())).encode()).hexdigest()[:16]
