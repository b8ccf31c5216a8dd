"""The operator's Orthanc (a DICOM server with a REST API), for ``POST /infer_orthanc``: series in by their Orthanc
identifiers, DICOM SEG back in, as the established nnU-Net server does it.

* Which Orthanc: ``--orthanc-url`` or ``$ORTHANC_URL``, with ``$ORTHANC_USER`` / ``$ORTHANC_PASSWORD`` for HTTP basic
  authentication (the established server's variables). *Ours*: without a URL the endpoint is off (404 saying so);
  the established server tries http://localhost:8042.
* A series is fetched as Orthanc's archive (``GET /series/{id}/archive``, a zip), streamed to the job's folder within
  ``--max-upload-bytes`` and unpacked with the uploads' safe unpacker (``jobs.unpack_archive``: no links, no ``..``,
  bounded size and entry count); the folder holding its files is the series folder the pipeline reads.
* A DICOM SEG goes back with ``POST /instances``; Orthanc files it under the source study (the SEG carries its
  StudyInstanceUID) and answers the series it made, which the response lists.

Errors: an identifier that is not one of Orthanc's (``xxxxxxxx-xxxxxxxx-xxxxxxxx-xxxxxxxx-xxxxxxxx``) or a series
Orthanc does not have: 400. Orthanc unreachable, refusing this server's credentials or failing: 503 naming it (the
client's request was fine).
"""

import logging
import os
import re

from ..errors import Unavailable
from ..validate import BadInput
from .jobs import unpack_archive

log = logging.getLogger("nninteractive_slicer_server")

URL_ENV, USER_ENV, PASSWORD_ENV = "ORTHANC_URL", "ORTHANC_USER", "ORTHANC_PASSWORD"
SERIES_ID = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{8}){4}$")
CHUNK = 1 << 20
TIMEOUT = (10.0, 300.0)  # connect, read (s)


class Orthanc:
    def __init__(self, url, user=None, password=None, timeout=TIMEOUT):
        self.url = url.rstrip("/")
        self.auth = (user, password) if user and password else None
        self.timeout = timeout

    @classmethod
    def from_settings(cls, url=None, environ=None):
        """The Orthanc the operator named (``--orthanc-url``, else ``$ORTHANC_URL``), or None."""
        environ = os.environ if environ is None else environ
        url = url or environ.get(URL_ENV)
        if not url:
            return None
        if not url.startswith(("http://", "https://")):
            raise ValueError("the Orthanc URL %r must start with http:// or https://" % url)
        return cls(url, environ.get(USER_ENV), environ.get(PASSWORD_ENV))

    def describe(self):
        return "%s%s" % (self.url, " (as %s)" % self.auth[0] if self.auth else "")

    # ------------------------------------------------------------------ HTTP

    def _call(self, method, path, what, **kw):
        import requests

        try:
            r = requests.request(method, self.url + path, auth=self.auth, timeout=self.timeout, **kw)
        except requests.RequestException as exc:
            raise Unavailable("the Orthanc server %s cannot be reached (%s) to %s; try again later, or ask the "
                              "operator" % (self.url, type(exc).__name__, what), retry_after=30)
        if r.status_code in (401, 403):
            r.close()
            raise Unavailable("the Orthanc server %s refused this server's credentials (ORTHANC_USER / "
                              "ORTHANC_PASSWORD) to %s; ask the operator" % (self.url, what))
        return r

    @staticmethod
    def check_id(series_id):
        if not isinstance(series_id, str) or not SERIES_ID.match(series_id):
            raise BadInput("series_ids: %r is not an Orthanc series identifier (five groups of 8 hex digits, as in "
                           "GET /series)" % (series_id,))
        return series_id

    def download_series(self, series_id, dest, limits):
        """Fetch series ``series_id`` into the new folder ``dest``; return the folder holding its files."""
        self.check_id(series_id)
        what = "fetch series %s" % series_id
        os.makedirs(dest)
        archive = dest + ".zip"
        with self._call("GET", "/series/%s/archive" % series_id, what, stream=True) as r:
            if r.status_code == 404:
                raise BadInput("series_ids: Orthanc (%s) has no series %s" % (self.url, series_id))
            if r.status_code != 200:
                raise Unavailable("the Orthanc server %s answered %d to %s" % (self.url, r.status_code, what))
            size = 0
            with open(archive, "wb") as out:
                for block in r.iter_content(CHUNK):
                    size += len(block)
                    limits.check_upload(size, "Orthanc's archive of series %s" % series_id)
                    out.write(block)
        try:
            unpack_archive(archive, dest, limits)
        finally:
            os.remove(archive)
        folders = sorted({dirpath for dirpath, _dirs, files in os.walk(dest) if files})
        if len(folders) != 1:
            raise BadInput("series_ids: Orthanc's archive of series %s holds %s" % (
                series_id, "no file" if not folders else "files in %d folders" % len(folders)))
        return folders[0]

    def upload(self, path):
        """Store the DICOM file ``path`` in Orthanc; return the Orthanc series it is filed under."""
        with open(path, "rb") as f:
            body = f.read()
        r = self._call("POST", "/instances", "store %s" % os.path.basename(path), data=body,
                       headers={"Content-Type": "application/dicom", "Accept": "application/json"})
        if r.status_code != 200:
            raise Unavailable("the Orthanc server %s answered %d when storing %s: %s"
                              % (self.url, r.status_code, os.path.basename(path), r.text[:200]))
        answer = r.json()
        log.info("auto: stored %s in Orthanc %s (series %s, %s)", os.path.basename(path), self.url,
                 answer.get("ParentSeries"), answer.get("Status"))
        return answer.get("ParentSeries")


def series_lists(series_ids):
    """``series_ids`` as one list per stage (a flat list: one stage, as established)."""
    if isinstance(series_ids, list) and (not series_ids or isinstance(series_ids[0], str)):
        return [list(series_ids)]
    return [list(s) for s in series_ids]
