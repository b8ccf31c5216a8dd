"""Benchmark: what reading a study through the server's private copy costs (``auto/paths.py``): every input a request
names on a server path is hard-linked (same file system) or copied (another one) into a private folder, its format
checked there (``auto/formats.py``), then read by SimpleITK. Printed against SimpleITK reading the file in place.

    python Testing/benchmark/staging_cost.py                   # 512 x 512 x 300 int16: NIfTI, NRRD, MHA, DICOM
    python Testing/benchmark/staging_cost.py --slices 600 --copy-scratch /dev/shm

Per input (median of ``--reps``, the variants interleaved): ``link`` (stage by hard link, the scratch folder on the
study's file system), ``copy`` (stage by copy through a descriptor: the scratch folder on ``--copy-scratch``, another
file system), ``check`` (the format allowlist on the staged file: a gzip header, a NRRD header, a MetaImage scan of
the whole file), ``read`` (probe, with the format check, and SimpleITK's read of the staged file) and ``in place``
(the same on the original). The page cache is warm for every variant (the study was just written): this is the cost the server adds,
not the disk's. Figures are printed, never asserted.
"""

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [os.path.join(REPO, "server"), os.path.join(REPO, "SlicerNNInteractive"), os.path.join(REPO, "Testing")]

MiB = 1 << 20


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slices", type=int, default=300, help="slices of 512 x 512 (default 300)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where the study is written (default: the temporary folder)")
    ap.add_argument("--copy-scratch", default="/dev/shm", help="a folder on another file system, for the copies")
    args = ap.parse_args()

    import SimpleITK as sitk

    import dicom_synth
    from nninteractive_slicer_server.auto import formats
    from nninteractive_slicer_server.auto import io as aio
    from nninteractive_slicer_server.auto.paths import PathGuard

    tmp = tempfile.mkdtemp(prefix="staging-cost-", dir=args.dir)
    copy_scratch = tempfile.mkdtemp(prefix="staging-cost-", dir=args.copy_scratch)
    if os.stat(copy_scratch).st_dev == os.stat(tmp).st_dev:
        print("note: --copy-scratch is on the study's file system: 'copy' falls back to hard links too")
    try:
        study = os.path.join(tmp, "study")
        os.makedirs(study)
        shape = (args.slices, 512, 512)
        vol = dicom_synth.volume(shape)
        image = sitk.GetImageFromArray(vol)
        image.SetSpacing((0.7, 0.7, 1.0))
        t0 = time.perf_counter()
        for name in ("ct.nii.gz", "ct.nii", "ct.nrrd", "ct.mha"):  # one folder each: ITK's NIfTI reader takes
            os.makedirs(os.path.join(study, name))              # ct.nii when asked for ct.nii.gz beside it
            sitk.WriteImage(image, os.path.join(study, name, name), name.endswith(".gz"))
        dicom_synth.write_stack(os.path.join(study, "dicom"), vol, pixel_spacing=(0.7, 0.7), modality="CT")
        print("study %s int16 (%.0f MB of voxels) written in %.0f s; %s, Python %s, SimpleITK %s"
              % ("x".join(map(str, shape[::-1])), vol.nbytes / MiB, time.perf_counter() - t0, platform.machine(),
                 platform.python_version(), sitk.Version.VersionString()))
        inputs = ["ct.nii.gz", "ct.nii", "ct.nrrd", "ct.mha", "dicom"]
        rows = {name: {k: [] for k in ("link", "copy", "check", "read", "in place")} for name in inputs}
        guard = PathGuard([tmp])
        try:
            for _rep in range(args.reps):
                for name in inputs:
                    path = os.path.join(study, name) if name == "dicom" else os.path.join(study, name, name)
                    is_dicom = name == "dicom"
                    r = rows[name]
                    r["in place"].append(timed(lambda: aio.read_input(aio.probe_series(path, is_dicom)))[0])
                    with guard.files("bench", scratch=tmp) as files:
                        dt, staged = timed(lambda: files.read(path, "series_folders"))
                        r["link"].append(dt)
                        if not is_dicom:
                            r["check"].append(timed(lambda: formats.identify(staged))[0])
                        r["read"].append(timed(lambda: aio.read_input(aio.probe_series(staged, is_dicom)))[0])
                    with guard.files("bench", scratch=copy_scratch) as files:
                        r["copy"].append(timed(lambda: files.read(path, "series_folders"))[0])
                        r["bytes"] = files.copied
        finally:
            guard.close()
        print("%-10s %9s %9s %9s %9s %9s %9s %10s" % ("input", "MB", "files", "link ms", "copy ms", "check ms",
                                                       "read ms", "in place"))
        for name in inputs:
            r = rows[name]
            files = len(os.listdir(os.path.join(study, name))) if name == "dicom" else 1
            med = {k: statistics.median(v) * 1e3 if v else float("nan") for k, v in r.items() if k != "bytes"}
            print("%-10s %9.1f %9d %9.1f %9.1f %9.1f %9.1f %10.1f" % (
                name, r["bytes"] / MiB, files, med["link"], med["copy"], med["check"], med["read"],
                med["in place"]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(copy_scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
