"""End to end with the tiny trained model: prompts placed in world coordinates on a rotated, anisotropic volume
under a parent transform go through geometry, rasterization, the controller and the labelmap scene, and segment
the right blob."""

import numpy as np
import pytest

from conftest import our_server
from phantoms import blob_mask, box_2d, dice, interior_voxel, lasso_2d, make_phantom, scribble_2d
from test_scene_geometry import rotation

from SlicerNNInteractiveLib import geometry as G
from SlicerNNInteractiveLib import rasterize as R
from SlicerNNInteractiveLib.client import RemoteSession
from SlicerNNInteractiveLib.controller import Controller
from SlicerNNInteractiveLib.scene import ArrayScene

SEED = 101  # a phantom the model never saw in training
AXIS = 2  # prompts on slices of the last array axis, like phantoms' 2D prompts


@pytest.fixture(scope="module")
def server(blob_model, tmp_path_factory):
    with our_server(blob_model, tmp_path_factory.mktemp("trained-scene"), "--max-sessions", "4") as (url, _):
        yield url


class World(object):
    """A volume geometry with rotated directions, anisotropic spacing, an origin and a parent transform."""

    def __init__(self):
        self.ijk_to_ras = np.eye(4)
        self.ijk_to_ras[:3, :3] = rotation(2, 25) @ rotation(0, 10) @ np.diag([0.7, 1.1, 2.5])
        self.ijk_to_ras[:3, 3] = [-20.0, 14.0, 3.0]
        self.parent = np.eye(4)  # the volume's parent transform: its RAS -> world
        self.parent[:3, :3] = rotation(1, -12)
        self.parent[:3, 3] = [4.0, -6.0, 9.0]
        self.ras_to_ijk = np.linalg.inv(self.ijk_to_ras)
        self.world_to_ras = np.linalg.inv(self.parent)
        self.ijk_to_world = self.parent @ self.ijk_to_ras

    def point(self, index):
        """World position of an array index (k, j, i) (continuous allowed)."""
        k, j, i = index
        return (self.ijk_to_world @ np.array([i, j, k, 1.0]))[:3]

    def to_ijk(self, points):
        return G.world_to_ijk(points, self.ras_to_ijk, self.world_to_ras)

    def slice_to_ras(self, axis, index):
        """SliceToRAS of a view showing array slice ``index`` of ``axis`` (aligned with the volume)."""
        in_plane = [2 - a for a in range(3) if a != axis]  # IJK axes spanning the plane
        u = self.ijk_to_world[:3, :3] @ np.eye(3)[in_plane[0]]
        v = self.ijk_to_world[:3, :3] @ np.eye(3)[in_plane[1]]
        u = u / np.linalg.norm(u)
        v = v - u * (u @ v)
        v = v / np.linalg.norm(v)
        s = np.eye(4)
        s[:3, 0], s[:3, 1], s[:3, 2] = u, v, np.cross(u, v)
        centre = [0.0, 0.0, 0.0]
        centre[axis] = index
        s[:3, 3] = self.point(centre)
        return s


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(seed=SEED)


def run_prompt(server, ph, k, kind, world):
    scene = ArrayScene(ph.image)
    c = Controller(scene, lambda: RemoteSession(server))
    errors = []
    c.on_error = lambda exc, job, dropped: errors.append(exc)
    try:
        shape = ph.image.shape
        if kind == "point":
            inside = interior_voxel(ph.labels, k)
            index = G.click_to_voxel(world.point(inside), world.ras_to_ijk, shape, world.world_to_ras)
            assert index == tuple(inside)
            c.submit("point", {"coordinates": index})
        elif kind == "box":
            box = box_2d(ph.labels, k, axis=AXIS)
            index = box[AXIS][0]
            placement = G.slice_placement(world.slice_to_ras(AXIS, index), world.ras_to_ijk, shape,
                                          world.world_to_ras)
            lo = [b[0] for b in box]
            hi = [b[1] - 1 for b in box]
            corners = world.to_ijk([world.point(lo), world.point(hi)])
            got = R.box_from_corners(corners[0], corners[1], placement, shape)
            assert got == box
            c.submit("bbox", {"bbox": got})
        elif kind == "scribble":
            painted = scribble_2d(ph.labels, k, axis=AXIS)
            pts = np.argwhere(painted)
            index = int(pts[0][AXIS])
            # a stroke along the painted scribble's longer extent, through its middle
            spread = pts.max(0) - pts.min(0)
            long_axis = [a for a in range(3) if a != AXIS][int(np.argmax([spread[a] for a in range(3) if a != AXIS]))]
            order = pts[np.argsort(pts[:, long_axis])]
            ends = [order[0].astype(float), order[-1].astype(float)]
            mid = pts.mean(0)
            for e in ends:
                for a in range(3):
                    if a != long_axis:
                        e[a] = mid[a]
                e[AXIS] = index
            stroke = world.to_ijk([world.point(e) for e in ends])
            placement = G.placement_from_points(stroke, shape)
            assert (placement.axis, placement.index) == (AXIS, index)
            mask, bbox = R.scribble_from_strokes([stroke], placement, shape, thickness=2)
            c.submit("scribble", {"mask": mask, "interaction_bbox": bbox})
        else:
            filled = lasso_2d(ph.labels, k, axis=AXIS)
            pts = np.argwhere(filled)
            index = int(pts[0][AXIS])
            centre, half = pts.mean(0), (pts.max(0) - pts.min(0)) / 2.0 + 0.5
            others = [a for a in range(3) if a != AXIS]
            outline = []
            for t in np.linspace(0, 2 * np.pi, 32, endpoint=False):
                p = [0.0, 0.0, 0.0]
                p[AXIS] = index
                p[others[0]] = centre[others[0]] + half[others[0]] * np.cos(t)
                p[others[1]] = centre[others[1]] + half[others[1]] * np.sin(t)
                outline.append(world.point(p))
            ijk = world.to_ijk(outline)
            placement = G.placement_from_points(ijk, shape)
            mask, bbox = R.lasso_from_polygon(ijk, placement, shape)
            c.submit("lasso", {"mask": mask, "interaction_bbox": bbox})
        c.wait()
        assert errors == []
        key = scene.selected_segment()
        return scene, c, key
    except Exception:
        c.close()
        raise


@pytest.mark.parametrize("kind", ["point", "box", "scribble", "lasso"])
def test_each_prompt_segments_its_blob(server, phantom, kind):
    world = World()
    scores = []
    for k in range(1, phantom.n_blobs + 1):
        scene, c, key = run_prompt(server, phantom, k, kind, world)
        try:
            scores.append(dice(scene.read_segment(key), blob_mask(phantom.labels, k)))
        finally:
            c.close()
    assert np.mean(scores) >= 0.7, scores


def test_negative_point_then_undo(server, phantom):
    world = World()
    scene, c, key = run_prompt(server, phantom, 1, "point", world)
    try:
        truth = blob_mask(phantom.labels, 1)
        positive = scene.read_segment(key).copy()
        assert dice(positive, truth) >= 0.7
        c.set_positive(False)
        c.submit("point", {"coordinates": interior_voxel(phantom.labels, 1)})
        c.wait()
        assert (scene.read_segment(key).astype(bool) & truth).sum() <= 0.2 * truth.sum()
        c.undo()
        c.wait()
        assert np.array_equal(scene.read_segment(key), positive)
    finally:
        c.close()
