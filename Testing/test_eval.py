"""``nninteractive-slicer-eval``: the simulated user's prompts (hand-checked), the metrics, the dataset layouts and
their errors, and whole runs: our server and the official one give the same curves, the library in-process too,
the trained blob model scores what its own evaluation (Testing/models/evaluate_blobs.py) finds, and a run resumes."""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

from conftest import SERVER_ENV, TORCH_THREADS, official_server, our_server
from phantoms import box_2d, dice as phantom_dice, interior_voxel, make_phantom, scribble_2d

from nninteractive_slicer_server.evaluate import cli, dataset as D, metrics as M, report
from nninteractive_slicer_server.evaluate.run import COLUMNS
from nninteractive_slicer_server.evaluate.simulate import box_prompt, click_prompt, scribble_prompt

SEEDS = (1000, 1001)  # phantoms evaluate_blobs.py uses (never seen in training)
SPACING_XYZ = (1.0, 1.0, 1.5)  # SimpleITK order; the arrays' [z, y, x] spacing is (1.5, 1, 1)


# ------------------------------------------------------------------------------------- the simulated user

def vol(shape=(10, 12, 14)):
    return np.zeros(shape, bool)


def test_click_goes_to_the_deepest_voxel_of_the_largest_error_with_the_seeded_draw_among_ties():
    gt = vol()
    gt[2:5, 3:6, 4:9] = True  # 3 x 3 x 5: on the centre line (z 3, y 4) the depth is min(2, x - 3, 9 - x)
    # x = 5, 6, 7 are 2 deep; RandomState(42).choice(3) == 2 picks the third in C order: x = 7
    assert click_prompt(vol(), gt).coords == (3, 4, 7)
    assert click_prompt(vol(), gt).positive

    cube = vol()
    cube[4:6, 6:8, 2:4] = True  # 2 x 2 x 2, every voxel 1 deep: choice(8) == 6 -> (1, 1, 0) from its corner
    assert click_prompt(vol(), cube).coords == (5, 7, 2)


def test_the_largest_error_component_wins_and_its_kind_gives_the_sign():
    gt = vol()
    gt[1:3, 1:3, 1:3] = True  # missed: 8 voxels
    pred = gt.copy()
    pred[1:3, 1:3, 1:3] = False
    pred[5:8, 5:8, 5:8] = True  # wrongly included: 27 voxels, centre 2 deep
    click = click_prompt(pred, gt)
    assert click.coords == (6, 6, 6) and not click.positive
    pred[5:8, 5:8, 5:8] = False
    pred[5:7, 5:7, 5:7] = True  # now 8 and 8: the first in C order (the missed cube) wins
    assert click_prompt(pred, gt).positive


def test_a_perfect_mask_gets_no_click_and_no_scribble():
    gt = vol()
    gt[2:6, 2:6, 2:6] = True
    assert click_prompt(gt.copy(), gt) is None
    assert scribble_prompt(gt.astype(np.uint8), gt) is None
    assert click_prompt(vol(), vol()) is None


def test_the_image_border_counts_as_outside_the_error():
    gt = vol()
    gt[0:5, 0:5, 0:5] = True  # a corner cube: its deepest voxel is its centre, not the corner
    assert click_prompt(vol(), gt).coords == (2, 2, 2)


def test_touching_objects_are_corrected_against_their_own_label():
    labels = np.zeros((12, 12, 16), np.uint8)
    labels[2:9, 2:9, 1:8] = 1
    labels[2:9, 2:9, 8:15] = 2  # touches label 1 face to face
    both = labels > 0
    # label 1's mask leaked into label 2: the correction is a negative click in the middle of label 2
    click = click_prompt(both, labels == 1)
    assert click.coords == (5, 5, 11) and not click.positive and labels[click.coords] == 2
    # label 2 not segmented yet: a positive click at its own centre, never in label 1
    click = click_prompt(vol(labels.shape), labels == 2)
    assert click.coords == (5, 5, 11) and click.positive


def test_the_box_is_taken_on_the_slice_of_the_middle_voxel_and_spans_the_z_range_in_3d():
    gt = vol((12, 12, 12))
    gt[2:4, 2:8, 3:9] = True  # 72 voxels on slices 2 and 3
    gt[4:10, 5, 5] = True  # a thin tail up to slice 9: the middle of the z range (6) is not the middle voxel
    # 78 voxels; the 39th in C order lies on slice 3 (slice 2 holds the first 36)
    assert box_prompt(gt).bbox == [[3, 4], [2, 8], [3, 9]]
    box = box_prompt(gt, three_d=True)
    assert box.bbox == [[2, 10], [2, 8], [3, 9]] and not box.is_2d


def test_a_scribble_runs_along_the_error_through_the_click_and_never_across_the_other_kind():
    gt = vol((6, 20, 20))
    gt[1:4, 4:7, 2:17] = True  # a 3 x 3 x 15 bar along x: the scribble is a stroke along x on slice 2
    sc = scribble_prompt(vol(gt.shape), gt, thickness=(1, 1))
    # on the centre line (z 2, y 5) x = 3..15 are 2 deep: RandomState(42).choice(13) == 6 picks x = 9
    assert sc.positive and sc.click.coords == (2, 5, 9)
    assert sc.bbox == [[2, 3], [5, 6], [2, 17]] and sc.mask.shape == (1, 1, 15) and sc.mask.all()
    assert sc.click.coords == click_prompt(vol(gt.shape), gt).coords
    # A mixed error component: a missed bar and, touching it, a wrongly included one. A negative scribble stays on
    # the wrongly included voxels.
    pred = vol(gt.shape)
    pred[1:4, 7:10, 2:17] = True  # beside the bar, touching it
    pred[1:4, 4:7, 2:17] = False
    sc = scribble_prompt(pred, gt, thickness=(2, 2))
    placed = np.zeros(gt.shape, bool)
    placed[tuple(slice(lo, hi) for lo, hi in sc.bbox)] = sc.mask.astype(bool)
    kind = gt if sc.positive else (pred & ~gt)
    assert placed.any() and not (placed & ~kind).any()


def test_nsd_is_spacing_aware_and_matches_a_brute_force_count():
    a, b = vol((8, 8, 8)), vol((8, 8, 8))
    a[2, 1:6, 1:6] = True
    b[3, 1:6, 1:6] = True  # one slice further: 2 mm apart at 2 mm slices
    assert M.nsd(a, b, (2.0, 1.0, 1.0), 1.9) == 0.0
    assert M.nsd(a, b, (2.0, 1.0, 1.0), 2.0) == 1.0
    assert M.nsd(a, b, (1.0, 1.0, 1.0), 1.0) == 1.0
    assert M.nsd(a, a, (1.0, 1.0, 1.0), 0.1) == 1.0 and M.nsd(a, vol((8, 8, 8)), (1, 1, 1), 5) == 0.0
    assert M.dice(a, b) == 0.0 and M.dice(a, a) == 1.0

    def brute(x, y, spacing, tol):
        def border(m):
            return m & ~ndimage.binary_erosion(m, ndimage.generate_binary_structure(3, 1), border_value=0)
        px, py = np.argwhere(border(x)) * spacing, np.argwhere(border(y)) * spacing
        d = np.sqrt(((px[:, None, :] - py[None, :, :]) ** 2).sum(-1))
        return ((d.min(1) <= tol).sum() + (d.min(0) <= tol).sum()) / (len(px) + len(py))

    rng = np.random.RandomState(0)
    for _ in range(10):
        x = ndimage.binary_dilation(rng.rand(12, 10, 9) > 0.97, iterations=2)
        y = ndimage.binary_dilation(rng.rand(12, 10, 9) > 0.97, iterations=2)
        spacing, tol = rng.uniform(0.5, 3.0, 3), rng.uniform(0.5, 4.0)
        assert M.nsd(x, y, spacing, tol) == pytest.approx(brute(x, y, spacing, tol), abs=1e-12)


def test_the_summary_takes_the_auc_over_the_corrections():
    rows = [{"case": "c", "label": "1", "protocol": "points", "step": str(i), "prompt": "point+", "dice": str(d),
             "nsd": str(n), "seconds": "0.5"} for i, (d, n) in enumerate([(0.1, 0.2), (0.5, 0.6), (0.7, 0.8),
                                                                            (0.9, 1.0)])]
    (s,) = report.summarize(rows, ["cvpr25", "points"])
    assert s["objects"] == 1 and s["dice"] == [0.1, 0.5, 0.7, 0.9]
    assert s["auc_dice"] == pytest.approx((0.5 + 0.7) / 2 + (0.7 + 0.9) / 2)  # steps 1..3, not step 0
    assert s["auc_nsd"] == pytest.approx((0.6 + 0.8) / 2 + (0.8 + 1.0) / 2)


# ------------------------------------------------------------------------------------- datasets

def write(path, array, spacing=SPACING_XYZ):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sitk.WriteImage(image, path)


@pytest.fixture(scope="module")
def raw_dataset(tmp_path_factory):
    """An nnU-Net raw dataset of two phantoms (imagesTs / labelsTs, channel suffixes, dataset.json)."""
    root = str(tmp_path_factory.mktemp("data") / "Dataset900_Blobs")
    for seed in SEEDS:
        ph = make_phantom(seed=seed)
        write(os.path.join(root, "imagesTs", "blob%d_0000.nii.gz" % seed), ph.image)
        write(os.path.join(root, "labelsTs", "blob%d.nii.gz" % seed), ph.labels)
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump({"channel_names": {"0": "MR"}, "labels": {"background": 0, "blob": 1}}, f)
    return root


def test_datasets_in_both_layouts(raw_dataset, tmp_path):
    cases = D.find_cases(raw_dataset)
    assert [c.name for c in cases] == ["blob1000", "blob1001"] and all(len(c.images) == 1 for c in cases)
    labels, spacing = D.load_labels(cases[0])
    assert spacing == [1.5, 1.0, 1.0] and D.objects(labels) == [1, 2, 3, 4] and D.objects(labels, [2, 9]) == [2]
    assert np.array_equal(D.load_image(cases[0], labels.shape)[0], make_phantom(seed=SEEDS[0]).image)
    # two folders, same names, two channels in one case (NRRD)
    img, lab = tmp_path / "img", tmp_path / "lab"
    a = np.zeros((4, 5, 6), np.int16)
    write(str(img / "p1_0000.nrrd"), a)
    write(str(img / "p1_0001.nrrd"), a + 1)
    write(str(lab / "p1.nrrd"), (a + 1).astype(np.uint8))
    (case,) = D.find_cases(str(img), str(lab))
    assert case.name == "p1" and len(case.images) == 2
    assert D.load_image(case, a.shape).shape == (2, 4, 5, 6)
    with pytest.raises(D.DatasetError, match="must be on the same grid"):
        D.load_image(case, (4, 5, 7))
    write(str(lab / "p1.nrrd"), a.astype(np.float32) + 0.5)
    with pytest.raises(D.DatasetError, match="not whole numbers"):
        D.load_labels(case)


def bad(tmp_path, images, labels):
    """Folders (name -> array) written as NIfTI under tmp_path; returns their paths."""
    for folder, files in (("img", images), ("lab", labels)):
        os.makedirs(tmp_path / folder, exist_ok=True)
        for name, array in files.items():
            write(str(tmp_path / folder / name), array)
    return str(tmp_path / "img"), str(tmp_path / "lab")


def cli_error(capsys, argv, code=2):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == code
    return capsys.readouterr().err


def test_the_cli_says_what_is_wrong_with_the_folders(tmp_path, capsys):
    out = ["--server", "http://127.0.0.1:9", "--out", str(tmp_path / "out")]
    m = np.ones((4, 4, 4), np.uint8)
    assert "does not exist" in cli_error(capsys, [str(tmp_path / "nowhere"), str(tmp_path)] + out)
    err = cli_error(capsys, [str(tmp_path)] + out)
    assert "not an nnU-Net raw dataset folder" in err and "give LABELS" in err
    images, labels = bad(tmp_path / "a", {"c1.nii.gz": m, "c2.nii.gz": m}, {"c1.nii.gz": m})
    err = cli_error(capsys, [images, labels] + out)
    assert "no label in" in err and "c2.nii.gz" in err
    assert "the same folder" in cli_error(capsys, [images, images] + out)
    images, labels = bad(tmp_path / "b", {"c1.nii.gz": m}, {"c1.nii.gz": m, "c3.nii.gz": m})
    assert "no image in" in cli_error(capsys, [images, labels] + out)
    images, labels = bad(tmp_path / "c", {"c1_0000.nii.gz": m, "c1_0002.nii.gz": m}, {"c1.nii.gz": m})
    assert "without a gap" in cli_error(capsys, [images, labels] + out)
    images, labels = bad(tmp_path / "d", {"c1.nii.gz": m}, {})
    assert "LABELS folder" in cli_error(capsys, [images, labels] + out) and "holds no" in cli_error(
        capsys, [images, labels] + out)
    err = cli_error(capsys, [images, labels, "--server", "http://h", "--model-dir", ".", "--out", "o"])
    assert "not allowed with" in err
    assert "required" in cli_error(capsys, [images, labels, "--out", "o"])


# ------------------------------------------------------------------------------------- whole runs

PROTOCOLS = ["cvpr25", "points", "scribbles"]
CLICKS = "2"


@pytest.fixture(scope="module")
def servers(blob_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval-servers")
    with our_server(blob_model, tmp) as (ours, _), official_server(blob_model, tmp) as (official, _):
        yield {"ours": ours, "official": official}


def read_rows(out):
    with open(os.path.join(str(out), "steps.csv"), newline="") as f:
        return list(csv.DictReader(f))


def evaluate(capsys, data, out, *args, protocols=PROTOCOLS):
    code = cli.main([data, "--out", str(out), "--protocol", *protocols, "--clicks", CLICKS, *args])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured


@pytest.fixture(scope="module")
def ours_run(servers, raw_dataset, tmp_path_factory):
    """Both phantoms, every protocol, through our server (shared by the tests below; they copy it to change it)."""
    out = tmp_path_factory.mktemp("ours") / "out"
    assert cli.main([raw_dataset, "--server", servers["ours"], "--out", str(out), "--protocol", *PROTOCOLS,
                     "--clicks", CLICKS]) == 0
    return out


def curves(rows, case=None, protocols=PROTOCOLS):
    return [{k: r[k] for k in COLUMNS if k != "seconds"} for r in rows
            if (case is None or r["case"] == case) and r["protocol"] in protocols]


COMPARED = ["cvpr25", "scribbles"]  # boxes, clicks and scribbles: every kind of prompt (points repeats the clicks)


def test_a_run_writes_every_step_the_summary_and_the_plot(ours_run):
    rows = read_rows(ours_run)
    assert len(rows) == 2 * 4 * len(PROTOCOLS) * (int(CLICKS) + 1)  # 2 cases, 4 blobs each
    assert {r["prompt"] for r in rows if r["step"] == "0"} == {"box2d", "point+", "scribble+"}
    assert all(float(r["seconds"]) > 0 for r in rows if r["prompt"] != "none")
    summary = open(os.path.join(str(ours_run), "summary.md")).read()
    assert all("| %s | 8 |" % p in summary for p in PROTOCOLS)
    with open(os.path.join(str(ours_run), "dice.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_our_server_and_the_official_server_give_identical_curves(servers, raw_dataset, ours_run, tmp_path, capsys):
    evaluate(capsys, raw_dataset, tmp_path / "official", "--server", servers["official"], "--cases", "blob1000",
             protocols=COMPARED)
    official = read_rows(tmp_path / "official")
    assert official and curves(official) == curves(read_rows(ours_run), "blob1000", COMPARED)


def test_in_process_gives_the_same_curves_through_the_command(blob_model, raw_dataset, ours_run, tmp_path):
    out = tmp_path / "local"
    proc = subprocess.run([sys.executable, "-m", "nninteractive_slicer_server.evaluate", raw_dataset, "--model-dir",
                           blob_model, "--device", "cpu", "--torch-threads", TORCH_THREADS, "--out", str(out),
                           "--protocol", *COMPARED, "--clicks", CLICKS, "--cases", "blob1001"],
                          env=SERVER_ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "| cvpr25 | 4 |" in proc.stdout
    assert curves(read_rows(out)) == curves(read_rows(ours_run), "blob1001", COMPARED)


def test_the_blob_model_scores_what_its_own_evaluation_finds(servers, ours_run):
    """evaluate_blobs.py prompts each blob at its deepest voxel (Dice 0.955 in Testing/models/README.md) and with
    2D boxes and scribbles on its largest slice (0.952 / 0.953); here the same prompts, through the same server, on the
    same phantoms, give the reference, and the simulated user's first prompts must score alike."""
    from SlicerNNInteractiveLib.client import RemoteSession

    reference = {"point": [], "box": [], "scribble": []}
    with RemoteSession(servers["ours"]) as s:
        for seed in SEEDS:
            ph = make_phantom(seed=seed)
            buf = np.zeros(ph.labels.shape, np.uint8)
            s.set_image(ph.image[None])
            s.set_target_buffer(buf)
            for k in range(1, ph.n_blobs + 1):
                gt = ph.labels == k
                for kind, call in (("point", lambda: s.add_point_interaction(interior_voxel(ph.labels, k), True)),
                                   ("box", lambda: s.add_bbox_interaction(box_2d(ph.labels, k, axis=0), True)),
                                   ("scribble", lambda: s.add_scribble_interaction(
                                       scribble_2d(ph.labels, k, axis=0), True))):
                    s.reset_interactions()
                    call()
                    reference[kind].append(phantom_dice(buf, gt))
    first = {p: [float(r["dice"]) for r in read_rows(ours_run) if r["protocol"] == p and r["step"] == "0"]
             for p in PROTOCOLS}
    for protocol, kind in (("points", "point"), ("cvpr25", "box"), ("scribbles", "scribble")):
        ours, ref = np.mean(first[protocol]), np.mean(reference[kind])
        assert ref >= 0.9 and abs(ours - ref) <= 0.03, (protocol, ours, ref)
    # Where both pick the same deepest voxel (evaluate_blobs takes the first of equally deep voxels, the challenge a
    # seeded draw among them), the same click through the same server gives the same Dice.
    same = [click_prompt(np.zeros(ph.labels.shape, bool), ph.labels == k).coords == interior_voxel(ph.labels, k)
            for ph in map(lambda seed: make_phantom(seed=seed), SEEDS) for k in range(1, ph.n_blobs + 1)]
    assert sum(same) >= 4
    assert [d for d, s in zip(first["points"], same) if s] == pytest.approx(
        [d for d, s in zip(reference["point"], same) if s], abs=1e-6)


def test_a_run_resumes_where_it_stopped(servers, raw_dataset, ours_run, tmp_path, capsys):
    out = tmp_path / "resumed"
    shutil.copytree(str(ours_run), str(out))
    rows = read_rows(out)
    keep = [r for r in rows if not (r["case"] == "blob1001" and r["label"] in ("3", "4") and r["protocol"] == "points")]
    cut = [r for r in rows if r["case"] == "blob1001" and r["label"] == "4" and r["protocol"] == "points"][:1]
    with open(os.path.join(str(out), "steps.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows(keep + cut)  # label 3 never written, label 4 cut after its first step
        f.write('blob1001,4,points,1,point-,"[1, 2')  # and a torn line
    captured = evaluate(capsys, raw_dataset, out, "--server", servers["ours"])
    assert "1/2 blob1000 already done" in captured.err and "2/2 blob1001 done (2 object runs)" in captured.err
    again = read_rows(out)
    assert again[:len(keep)] == keep  # untouched, times included: not run again
    assert sorted(curves(again), key=str) == sorted(curves(rows), key=str)
    # other settings in the same folder would mix incomparable rows
    err = cli_error(capsys, [raw_dataset, "--server", servers["ours"], "--out", str(out), "--clicks", "3"])
    assert "other settings" in err and "clicks 2, not 3" in err


def test_a_3d_box_for_a_model_that_takes_only_2d_boxes_is_refused(servers, raw_dataset, tmp_path, capsys):
    code = cli.main([raw_dataset, "--server", servers["ours"], "--out", str(tmp_path / "o"), "--box", "3d"])
    assert code == 1
    err = capsys.readouterr().err
    assert "takes only 2D boxes" in err and "--box 2d" in err
