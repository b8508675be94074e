import math
from dataclasses import replace

import numpy as np
import pytest
from scipy.spatial import cKDTree
from scipy.spatial.distance import squareform

from fnl.data.parts import NUM_FINE_PARTS, POINT_LABEL_SYMMETRIES
from fnl.data.synthetic.body import (
    MIRROR,
    axis_rotation,
    build_body_surface,
    build_template,
    mirror_rotations,
    mirror_spec,
    mirror_uv,
    pose_mesh,
    uv_symmetry_tables,
)
from fnl.data.synthetic.raster import rasterize
from fnl.data.synthetic.scene import Person, mirror_person, render_people, sample_person


@pytest.fixture(scope="module")
def template():
    return build_template()


def test_template_size_units_and_charts(template):
    assert 1000 < template.num_mesh_vertices <= 3000
    positions = template.mesh_positions
    assert positions[:, 1].min() > 0 and 1.65 < positions[:, 1].max() < 1.8  # standing on the floor, ~1.74 m
    assert set(np.unique(template.chart_vertex_part)) == set(range(1, NUM_FINE_PARTS + 1))
    for part in range(1, NUM_FINE_PARTS + 1):
        uv = template.chart_vertex_uv[template.chart_vertex_part == part]
        np.testing.assert_allclose([uv.min(axis=0), uv.max(axis=0)], [[0, 0], [1, 1]])
    # Closed, outward-wound surface: the enclosed volume (divergence theorem) is positive and human-sized.
    corners = positions[template.chart_vertex_mesh[template.triangles]]
    volume = np.einsum("ij,ij->", np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]),
                       corners[:, 0]) / 6
    assert 0.04 < volume < 0.09  # m^3


def test_template_is_mirror_symmetric_with_the_written_uv_tables(template):
    """Mirroring a chart vertex (X -> -X) lands on the vertex of the symmetric chart at (1 - U, V)."""
    positions = template.mesh_positions[template.chart_vertex_mesh]
    part, uv = template.chart_vertex_part, template.chart_vertex_uv
    mirrored_u, mirrored_v = mirror_uv(uv[:, 0], uv[:, 1])
    lookup = {(int(p), round(float(a), 6), round(float(b), 6)): k
              for k, (p, (a, b)) in enumerate(zip(part, uv, strict=True))}
    seam_tolerance = 1e-9
    for k in range(len(part)):
        twin = lookup[(POINT_LABEL_SYMMETRIES[part[k]], round(float(mirrored_u[k]), 6), round(float(mirrored_v[k]), 6))]
        assert np.abs(MIRROR @ positions[k] - positions[twin]).max() < seam_tolerance
    u_table, v_table = uv_symmetry_tables()
    assert u_table.shape == v_table.shape == (24, 256, 256)
    grid = np.arange(256) / 255
    np.testing.assert_allclose(u_table[5, 17], 1 - grid)  # row = V, column = U
    np.testing.assert_allclose(v_table[5, :, 17], grid)


def test_mirror_spec_is_an_involution_and_central_segments_are_self_symmetric(template):
    for spec in template.segments:
        twice = mirror_spec(mirror_spec(spec))
        assert twice.name == spec.name and twice.charts == spec.charts
        assert math.isclose(math.remainder(twice.chart_start - spec.chart_start, 2 * math.pi), 0, abs_tol=1e-12)
    torso = template.segments[template.segment_index("torso")]
    assert set(mirror_spec(torso).charts) == set(torso.charts)


def test_body_surface_geodesics(template):
    surface = build_body_surface()
    count = surface.num_mesh_vertices
    assert count == template.num_mesh_vertices
    assert surface.geodesic.dtype == np.float32 and len(surface.geodesic) == count * (count - 1) // 2
    assert surface.geodesic.nbytes <= 18e6
    assert np.all(np.isfinite(surface.geodesic)) and surface.geodesic.min() >= 0
    assert len(surface.vertex_part) == len(surface.vertex_uv) == len(surface.vertex_to_mesh) > count
    assert surface.vertex_to_mesh.max() < count
    distances = squareform(surface.geodesic)
    positions = template.mesh_positions
    crown, sole = int(np.argmax(positions[:, 1])), int(np.argmin(positions[:, 1]))
    assert 1.6 < distances[crown, sole] < 2.4  # meters over the body, a little more than its height
    # A geodesic is never shorter than the straight line.
    sample = np.random.default_rng(0).integers(0, count, size=(500, 2))
    straight = np.linalg.norm(positions[sample[:, 0]] - positions[sample[:, 1]], axis=1)
    assert np.all(distances[sample[:, 0], sample[:, 1]] >= straight - 1e-5)
    # Hand to hand goes over the shoulders, not across the gap: longer than the arm span in the air.
    hands = [template.chart_vertex_mesh[template.chart_vertex_part == p] for p in (3, 4)]
    tips = [h[np.argmin(positions[h, 1])] for h in hands]
    assert distances[tips[0], tips[1]] > np.linalg.norm(positions[tips[0]] - positions[tips[1]]) + 0.2
    # Seam duplicates: the torso's front and back charts share their boundary vertices.
    front = template.chart_vertex_mesh[template.chart_vertex_part == 2]
    back = template.chart_vertex_mesh[template.chart_vertex_part == 1]
    assert len(np.intersect1d(front, back)) >= 2 * (template.segments[0].rings - 2)


def test_posing_mirrored_rotations_gives_the_mirror_image(template):
    rng = np.random.default_rng(1)
    rotations = {spec.name: axis_rotation(rng.normal(size=3), rng.uniform(-1, 1)) for spec in template.segments}
    global_rotation = axis_rotation((0, 1, 0), 0.7)
    posed = pose_mesh(template, rotations, global_rotation, width_scale=1.1)
    mirrored = pose_mesh(template, mirror_rotations(rotations), MIRROR @ global_rotation @ MIRROR, width_scale=1.1)
    tree = cKDTree(mirrored)
    distance, _ = tree.query(posed @ MIRROR.T)
    assert distance.max() < 1e-9


def test_rasterizer_coverage_and_depth_order():
    square = np.array([[[2.0, 2.0], [10.0, 2.0], [10.0, 10.0]], [[2.0, 2.0], [10.0, 10.0], [2.0, 10.0]]])
    far = np.zeros((2, 3))
    near_triangle = np.array([[[0.0, 0.0], [12.0, 0.0], [0.0, 12.0]]])
    triangle, weights = rasterize(np.concatenate([square, near_triangle]),
                                  np.concatenate([far, np.ones((1, 3))]), 16, 16)
    covered = triangle >= 0
    # The square covers pixel centres 2.5..9.5 (8x8 pixels, no pixel twice); the nearer triangle wins its half.
    assert covered.sum() == 64 + np.sum([(c + 0.5) + (r + 0.5) <= 12 for r in range(16) for c in range(16)
                                          if not (2 <= r <= 9 and 2 <= c <= 9)])
    assert triangle[3, 3] == 2 and triangle[9, 9] in (0, 1) and triangle[15, 15] == -1
    np.testing.assert_allclose(weights[covered].sum(axis=1), 1, atol=1e-6)
    # Barycentric weights reproduce the pixel centre.
    r, c = 5, 8
    corners = np.concatenate([square, near_triangle])[triangle[r, c]]
    np.testing.assert_allclose(weights[r, c] @ corners, [c + 0.5, r + 0.5], atol=1e-5)


def _standing_person(yaw: float) -> Person:
    return Person(rotations={}, global_rotation=axis_rotation((0, 1, 0), yaw), width_scale=1.0,
                  pixels_per_meter=100 / 1.74, origin=(64.0, 114.0), depth_offset=0.0,
                  part_colors=np.full((25, 3), 0.5), hair_color=np.zeros(3), print_contrast=0.3)


def _centre(render, parts):
    rows, cols = np.nonzero(np.isin(render.part, parts))
    assert len(rows), f"parts {parts} not visible"
    return cols.mean(), rows.mean()


def test_rendering_puts_parts_where_a_standing_person_has_them(template):
    facing = render_people(template, [_standing_person(0.0)], 128, 128)
    assert np.count_nonzero(facing.part == 2) > 300 and np.count_nonzero(facing.part == 1) == 0  # front, no back
    head_x, head_y = _centre(facing, [23, 24])
    _, torso_y = _centre(facing, [2])
    _, feet_y = _centre(facing, [5, 6])
    assert head_y < torso_y < feet_y
    right_hand_x, _ = _centre(facing, [3])
    left_hand_x, _ = _centre(facing, [4])
    assert right_hand_x < head_x < left_hand_x  # the person's right is the image's left
    assert _centre(facing, [23])[0] < _centre(facing, [24])[0]
    assert _centre(facing, [16, 20])[0] < head_x < _centre(facing, [15, 19])[0]  # right arm front on the left
    np.testing.assert_array_equal(facing.person >= 0, facing.part > 0)
    assert facing.u[facing.part > 0].min() >= 0 and facing.u.max() <= 1

    turned = render_people(template, [_standing_person(math.pi)], 128, 128)
    assert np.count_nonzero(turned.part == 1) > 300 and np.count_nonzero(turned.part == 2) == 0
    assert _centre(turned, [3])[0] > _centre(turned, [4])[0]
    assert _centre(turned, [18, 22])[0] > _centre(turned, [17, 21])[0]  # arm backs, right arm now on the right


def test_nearer_person_occludes(template):
    behind, front = _standing_person(0.0), _standing_person(0.0)
    front = replace(front, origin=(74.0, 114.0), depth_offset=1000.0)
    render = render_people(template, [behind, front], 128, 128)
    alone = render_people(template, [behind], 128, 128)
    assert 0 < np.count_nonzero(render.person == 0) < np.count_nonzero(alone.person == 0)
    front_alone = render_people(template, [front], 128, 128)
    assert np.count_nonzero(render.person == 1) == np.count_nonzero(front_alone.person == 0)


def test_rendering_the_mirrored_person_is_the_flipped_rendering(template):
    rng = np.random.default_rng(5)
    person = replace(sample_person(rng, template, 96, 96, height_fraction=0.9, depth_rank=0), origin=(48.0, 90.0))
    render = render_people(template, [person], 96, 96)
    mirrored = render_people(template, [mirror_person(person, 96)], 96, 96)
    flipped_part = np.asarray(POINT_LABEL_SYMMETRIES)[render.part[:, ::-1]]
    np.testing.assert_array_equal(mirrored.part, flipped_part)
    visible = mirrored.part > 0
    assert visible.sum() > 500
    np.testing.assert_allclose(mirrored.u[visible], 1 - render.u[:, ::-1][visible], atol=1e-5)
    np.testing.assert_allclose(mirrored.v[visible], render.v[:, ::-1][visible], atol=1e-5)
