"""Prompts placed the way the module places them in Slicer, on real MRML nodes, segmented by the tiny trained model.

A rotated, anisotropic volume with an offset origin sits under a parent transform. Points are markups control
points (under a transform of their own), boxes are drawn on real slice nodes turned to each of the volume's
planes by Slicer (RotateToVolumePlane), lassos are closed curves, scribbles are what a brush leaves in the
module's scratch segmentation. The module's scene adapter turns them into voxels, the controller sends them to
our server, and the result lands in a real Slicer segmentation, where it must cover the right blob.
"""

import numpy as np
import pytest
import vtk

import slicer

from conftest import our_server
from mrml import MrmlScene, add_linear_transform, write_segment
from phantoms import blob_mask, box_2d, dice, interior_voxel, lasso_2d, make_phantom, scribble_2d
from test_scene_geometry import rotation
from test_scene_trained import World

from SlicerNNInteractiveLib import rasterize as R
from SlicerNNInteractiveLib.client import RemoteSession
from SlicerNNInteractiveLib.controller import Controller
from SlicerNNInteractiveLib.geometry import GeometryError
from SlicerNNInteractiveLib.slicerscene import definedWorldPoints, scratchSegmentation

SEED = 101  # a phantom the model never saw in training
ORIENTATIONS = ("Axial", "Sagittal", "Coronal")


@pytest.fixture(scope="module")
def server(blob_model, tmp_path_factory):
    with our_server(blob_model, tmp_path_factory.mktemp("slicer-prompts"), "--max-sessions", "4") as (url, _):
        yield url


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(seed=SEED)


class Setup(object):
    """The phantom as a transformed volume in a real MRML scene, a slice view, and a controller on it."""

    def __init__(self, server, phantom, segmentation_transformed=True):
        self.world = World()
        self.labels = phantom.labels
        self.scene = MrmlScene(phantom.image, ijk_to_ras=self.world.ijk_to_ras)
        self.mrml = self.scene.mrml
        transform = add_linear_transform(self.mrml, self.world.parent)
        self.scene.volume_node.SetAndObserveTransformNodeID(transform.GetID())
        if segmentation_transformed:
            self.scene.segmentation_node.SetAndObserveTransformNodeID(transform.GetID())
        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(self.mrml, True)
        self.slice_node = self.mrml.AddNewNodeByClass("vtkMRMLSliceNode")
        self.errors = []
        self.controller = Controller(self.scene, lambda: RemoteSession(server),
                                     on_error=lambda exc, job, dropped: self.errors.append(exc))

    def close(self):
        self.controller.close()

    def show_slice(self, orientation, index_kji):
        """Turn the slice view to the volume plane closest to ``orientation``, through ``index_kji``;
        returns the array axis it shows, as the scene adapter reads it."""
        self.slice_node.SetOrientation(orientation)
        self.slice_node.RotateToVolumePlane(self.scene.volume_node)
        self.slice_node.JumpSliceByCentering(*self.world.point(index_kji))
        placement = self.scene.sliceNodePlacement(self.slice_node)
        assert placement.index == index_kji[placement.axis] and abs(placement.offset) < 1e-6
        return placement.axis

    def markups(self, class_name, points_kji, transform=None):
        node = self.mrml.AddNewNodeByClass(class_name)
        if transform is not None:
            node.SetAndObserveTransformNodeID(add_linear_transform(self.mrml, transform).GetID())
        for p in points_kji:
            node.AddControlPointWorld(vtk.vtkVector3d(*self.world.point(p)))
        return [world for _, _, world in definedWorldPoints(node)]

    def run(self, kind, args, positive=True):
        self.controller.set_positive(positive)
        self.controller.submit(kind, args)
        self.controller.wait()
        assert self.errors == []
        return self.scene.read_segment(self.scene.selected_segment()).astype(bool)


@pytest.fixture
def setup(server, phantom):
    s = Setup(server, phantom)
    yield s
    s.close()


def other_axes(axis):
    return [a for a in range(3) if a != axis]


def point_args(s, blob):
    inside = interior_voxel(s.labels, blob)
    # The markups node has a transform of its own: its world position is what counts.
    shift = np.eye(4)
    shift[:3, :3] = rotation(0, 30)
    shift[:3, 3] = [5.0, -3.0, 7.0]
    world = s.markups("vtkMRMLMarkupsFiducialNode", [inside], transform=shift)
    args = s.scene.pointPrompt(world[0])
    assert args == {"coordinates": tuple(inside)}
    return args


def box_args(s, blob, orientation):
    inside = interior_voxel(s.labels, blob)
    axis = s.show_slice(orientation, inside)
    box = box_2d(s.labels, blob, axis=axis, slice_index=int(inside[axis]))
    lo = [b[0] for b in box]
    hi = [b[1] - 1 for b in box]
    args = s.scene.boxPrompt(s.slice_node, s.world.point(lo), s.world.point(hi))
    assert args == {"bbox": box}
    return args


def lasso_args(s, blob, orientation):
    inside = interior_voxel(s.labels, blob)
    axis = s.show_slice(orientation, inside)
    filled = lasso_2d(s.labels, blob, axis=axis, slice_index=int(inside[axis]))
    pts = np.argwhere(filled)
    centre, half = pts.mean(0), (pts.max(0) - pts.min(0)) / 2.0 + 0.5
    u, v = other_axes(axis)
    outline = []
    for t in np.linspace(0, 2 * np.pi, 24, endpoint=False):
        p = [0.0, 0.0, 0.0]
        p[axis] = inside[axis]
        p[u] = centre[u] + half[u] * np.cos(t)
        p[v] = centre[v] + half[v] * np.sin(t)
        outline.append(p)
    args = s.scene.lassoPrompt(s.markups("vtkMRMLMarkupsClosedCurveNode", outline))
    (k0, k1), (j0, j1), (i0, i1) = args["interaction_bbox"]
    assert k1 - k0 == 1 or j1 - j0 == 1 or i1 - i0 == 1
    assert args["interaction_bbox"][axis] == [int(inside[axis]), int(inside[axis]) + 1]
    return args


def scribble_args(s, blob, orientation):
    inside = interior_voxel(s.labels, blob)
    axis = s.show_slice(orientation, inside)
    painted = scribble_2d(s.labels, blob, axis=axis, slice_index=int(inside[axis]))
    scratch = scratchSegmentation(s.mrml, s.scene.volume_node)
    write_segment(scratch, "scribble", painted, s.scene.volume_node)  # what the paint effect leaves
    args = s.scene.scribblePrompt(scratch, "scribble")
    expected = R.crop_to_bbox(painted)
    assert args["interaction_bbox"] == expected[1] and np.array_equal(args["mask"], expected[0])
    return args


PROMPTS = [("point", "point", None)] + [
    (kind, name, orientation) for kind, name in (("bbox", "box"), ("lasso", "lasso"), ("scribble", "scribble"))
    for orientation in ORIENTATIONS]


@pytest.mark.parametrize("kind,name,orientation", PROMPTS, ids=["%s-%s" % (p[1], p[2]) for p in PROMPTS])
def test_each_prompt_from_slicer_nodes_segments_its_blob(server, phantom, kind, name, orientation):
    scores = []
    for blob in range(1, phantom.n_blobs + 1):
        s = Setup(server, phantom)
        try:
            if name == "point":
                args = point_args(s, blob)
            else:
                args = {"box": box_args, "lasso": lasso_args, "scribble": scribble_args}[name](s, blob, orientation)
            scores.append(dice(s.run(kind, args), blob_mask(phantom.labels, blob)))
        finally:
            s.close()
    assert np.mean(scores) >= 0.7, scores


def test_segmentation_outside_the_volume_transform_gets_the_same_result(server, phantom):
    """The segmentation node need not sit under the volume's transform: the result is written on the volume's
    grid expressed in the segmentation's coordinates, and Slicer's own export agrees voxel for voxel."""
    results = []
    for transformed in (True, False):
        s = Setup(server, phantom, segmentation_transformed=transformed)
        try:
            results.append(s.run("point", point_args(s, 1)))
        finally:
            s.close()
    assert results[0].any() and np.array_equal(results[0], results[1])


def test_negative_point_and_undo_on_a_slicer_segment(setup, phantom):
    truth = blob_mask(phantom.labels, 2)
    positive = setup.run("point", point_args(setup, 2))
    assert dice(positive, truth) >= 0.7
    after = setup.run("point", point_args(setup, 2), positive=False)
    assert (after & truth).sum() <= 0.2 * truth.sum()
    setup.controller.undo()
    setup.controller.wait()
    assert np.array_equal(setup.scene.read_segment(setup.scene.selected_segment()).astype(bool), positive)


def test_oblique_slice_view_is_refused(setup):
    inside = interior_voxel(setup.labels, 1)
    setup.show_slice("Axial", inside)
    tilt = vtk.vtkTransform()
    tilt.RotateX(20)
    oblique = vtk.vtkMatrix4x4()
    vtk.vtkMatrix4x4.Multiply4x4(tilt.GetMatrix(), setup.slice_node.GetSliceToRAS(), oblique)
    setup.slice_node.GetSliceToRAS().DeepCopy(oblique)
    setup.slice_node.UpdateMatrices()
    with pytest.raises(GeometryError, match="not aligned"):
        setup.scene.boxPrompt(setup.slice_node, setup.world.point(inside), setup.world.point(inside))


def test_scribble_painted_on_an_oblique_view_is_refused(setup):
    painted = np.zeros(setup.labels.shape, bool)
    for n in range(10):
        painted[30 + n // 3, 20 + n, 30] = True  # a stroke crossing several slices along every axis
        painted[30, 20, 30 + n // 3] = True
    scratch = scratchSegmentation(setup.mrml, setup.scene.volume_node)
    write_segment(scratch, "scribble", painted, setup.scene.volume_node)
    with pytest.raises(GeometryError, match="more than one voxel slice"):
        setup.scene.scribblePrompt(scratch, "scribble")


def bending_transform_node(mrml):
    """A non-linear (thin-plate spline) transform that bends space by a few millimetres."""
    source, target = vtk.vtkPoints(), vtk.vtkPoints()
    for x in (-100.0, 100.0):
        for y in (-100.0, 100.0):
            for z in (-100.0, 100.0):
                source.InsertNextPoint(x, y, z)
                target.InsertNextPoint(x, y, z)
    source.InsertNextPoint(0.0, 0.0, 0.0)
    target.InsertNextPoint(3.0, -2.0, 4.0)
    spline = vtk.vtkThinPlateSplineTransform()
    spline.SetSourceLandmarks(source)
    spline.SetTargetLandmarks(target)
    spline.SetBasisToR()
    node = mrml.AddNewNodeByClass("vtkMRMLTransformNode")
    node.SetAndObserveTransformToParent(spline)
    return node


def test_points_under_a_bending_transform_map_to_their_voxel_and_boxes_are_refused(setup):
    node = bending_transform_node(setup.mrml)
    setup.scene.volume_node.SetAndObserveTransformNodeID(node.GetID())
    assert not node.IsTransformToWorldLinear()
    to_world = vtk.vtkGeneralTransform()
    node.GetTransformToWorld(to_world)
    for index in [(10, 20, 30), (40, 5, 50), (32, 32, 32)]:
        ras = setup.world.ijk_to_ras @ np.array([index[2], index[1], index[0], 1.0])
        world = to_world.TransformPoint(ras[:3])
        assert setup.scene.pointPrompt(world) == {"coordinates": index}
    with pytest.raises(GeometryError, match="non-linear"):
        setup.scene.boxPrompt(setup.slice_node, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0])


def test_segmentation_on_another_grid_is_refused_and_kept(setup, phantom):
    """A segment drawn on another voxel grid (e.g. made for another volume) cannot take a result voxel for
    voxel: a clear message, and the segment is untouched."""
    scene = setup.scene
    key = scene.add_segment()
    mine = np.zeros(setup.labels.shape, bool)
    mine[5:15, 5:15, 5:15] = True
    write_segment(scene.segmentation_node, key, mine, scene.volume_node)
    labelmap = scene.segmentation_node.GetBinaryLabelmapInternalRepresentation(key)
    m = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(m)
    m.SetElement(0, 3, m.GetElement(0, 3) + 0.3)  # off the volume's lattice by a fraction of a voxel
    labelmap.SetImageToWorldMatrix(m)
    before = np.array(vtk.util.numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars()))
    setup.controller.submit("point", point_args(setup, 1))
    setup.controller.wait()
    assert len(setup.errors) == 1 and "voxel grid differs" in str(setup.errors[0])
    after = vtk.util.numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars())
    assert np.array_equal(before, after)
