"""The synthetic template body: a surface made of 24 charts with DensePose's part meanings.

Body frame (rest pose, meters): Y up with the feet on Y = 0, Z toward the person's front, X toward the person's
*left*, so that a person facing the camera shows their right side on the image's left, as in photographs.

Each body segment (torso, head, and per side upper/lower arm, hand, upper/lower leg, foot) is a surface of
revolution around its axis: a radius profile along the axis (zero at both ends, so the surface is closed, with a pole
at each end) and an elliptical cross-section. A point of a segment has an axial coordinate (the arc length along
the profile, 0 at the proximal pole, 1 at the distal one) and an angle ``theta`` around the axis, measured from the
segment's side direction ``s = axis x front`` toward ``front``. The angle range is split into the segment's charts:
front and back halves for limbs and torso, left and right halves for the head, one chart for a hand or a foot.
Chart coordinates are ``U`` = the angle's fraction of the chart's range and ``V`` = the axial coordinate.

Left segments are the mirror images (X -> -X) of right ones, with charts laid out so that mirroring maps the point
(U, V) of chart ``i`` to the point (1 - U, V) of chart ``POINT_LABEL_SYMMETRIES[i]``: the synthetic UV symmetry
file is exact. The mesh joins segments only at the joints of the kinematic tree (edges between nearby vertices of a
child and its parent), so geodesic distances walk over the body, not through the gap between two legs.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import numpy as np
from scipy.interpolate import PchipInterpolator
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components, shortest_path
from scipy.spatial import cKDTree
from scipy.spatial.distance import cdist, squareform

from fnl.data.parts import NUM_FINE_PARTS, POINT_LABEL_SYMMETRIES
from fnl.data.surface import BodySurface
from fnl.data.transforms import UV_TABLE_SIZE

MIRROR = np.diag([-1.0, 1.0, 1.0])  # reflection through the body's sagittal plane X = 0
EVALUATION_SUBDIVISION = 2  # the evaluation vertex table samples each chart this much finer than the mesh


@dataclass(frozen=True)
class SegmentSpec:
    name: str
    parent: str | None
    joint: tuple[float, float, float]  # rest position of the proximal joint, the segment's centre of rotation
    axis: tuple[float, float, float]  # unit direction from the joint along the segment
    front: tuple[float, float, float]  # unit direction perpendicular to the axis: theta = pi / 2
    profile: tuple[tuple[float, float], ...]  # (position along the axis from the joint, radius); radius 0 at ends
    section: tuple[float, float]  # radius scale along the side (theta = 0) and front directions
    charts: tuple[int, ...]  # chart ids in order of increasing theta; each covers 2 pi / len(charts)
    chart_start: float  # theta where the first chart begins
    rings: int  # mesh rings along the axis, poles included
    angles: int  # mesh vertices around the axis; a multiple of len(charts)

    @property
    def side(self) -> np.ndarray:
        return np.cross(self.axis, self.front)


def _unit(vector: tuple[float, float, float] | np.ndarray) -> tuple[float, float, float]:
    array = np.asarray(vector, dtype=np.float64)
    return tuple(float(c) for c in array / np.linalg.norm(array))


def _mirror_name(name: str) -> str:
    if name.startswith("right_"):
        return "left_" + name[len("right_"):]
    if name.startswith("left_"):
        return "right_" + name[len("left_"):]
    return name


def mirror_spec(spec: SegmentSpec) -> SegmentSpec:
    """The segment's mirror image. With ``s = axis x front``, reflecting a point at angle theta gives the point at
    pi - theta of the mirrored segment, so the chart ranges reflect and their order reverses."""
    def reflect(v: tuple[float, float, float]) -> tuple[float, float, float]:
        return tuple(float(c) for c in MIRROR @ np.asarray(v))

    return replace(
        spec,
        name=_mirror_name(spec.name),
        parent=None if spec.parent is None else _mirror_name(spec.parent),
        joint=reflect(spec.joint),
        axis=reflect(spec.axis),
        front=reflect(spec.front),
        charts=tuple(POINT_LABEL_SYMMETRIES[c] for c in reversed(spec.charts)),
        chart_start=-math.pi - spec.chart_start,
    )


def _template_specs() -> tuple[SegmentSpec, ...]:
    """Rest pose: arms slightly abducted and legs slightly apart, so that no two unjoined segments intersect much.
    Sizes are those of a ~1.74 m adult, in meters, so geodesic distances share SMPL's units (GPS's kappa)."""
    z_axis = (0.0, 0.0, 1.0)
    arm = math.radians(18.0)
    arm_axis = _unit((-math.sin(arm), -math.cos(arm), 0.0))
    leg = math.radians(3.0)
    leg_axis = _unit((-math.sin(leg), -math.cos(leg), 0.0))
    shoulder = np.array([-0.175, 1.39, 0.0])
    elbow = shoulder + 0.28 * np.asarray(arm_axis)
    wrist = elbow + 0.25 * np.asarray(arm_axis)
    hip = np.array([-0.095, 0.90, 0.0])
    knee = hip + 0.42 * np.asarray(leg_axis)
    ankle = knee + 0.40 * np.asarray(leg_axis)
    foot_axis = _unit((0.0, -0.25, 1.0))
    foot_front = _unit((0.0, 1.0, 0.25))

    def point(p: np.ndarray) -> tuple[float, float, float]:
        return tuple(float(c) for c in p)

    half, whole = math.pi, 2 * math.pi
    torso = SegmentSpec(
        "torso", None, (0.0, 0.90, 0.0), (0.0, 1.0, 0.0), z_axis,
        ((-0.10, 0.0), (-0.085, 0.09), (-0.05, 0.15), (0.02, 0.165), (0.15, 0.145), (0.30, 0.155), (0.42, 0.17),
         (0.50, 0.15), (0.55, 0.09), (0.57, 0.0)),
        (1.0, 0.62), (2, 1), 0.0, rings=20, angles=28)
    head = SegmentSpec(
        "head", "torso", (0.0, 1.44, 0.0), (0.0, 1.0, 0.0), z_axis,
        ((0.0, 0.0), (0.01, 0.05), (0.07, 0.055), (0.10, 0.075), (0.16, 0.10), (0.23, 0.095), (0.28, 0.06),
         (0.30, 0.0)),
        (0.82, 1.0), (24, 23), -half / 2, rings=16, angles=24)
    right = (
        SegmentSpec("right_upper_arm", "torso", point(shoulder), arm_axis, z_axis,
                    ((-0.045, 0.0), (-0.035, 0.038), (0.0, 0.048), (0.14, 0.042), (0.28, 0.036), (0.305, 0.0)),
                    (1.0, 1.0), (16, 18), 0.0, rings=12, angles=16),
        SegmentSpec("right_lower_arm", "right_upper_arm", point(elbow), arm_axis, z_axis,
                    ((-0.03, 0.0), (-0.02, 0.033), (0.06, 0.036), (0.25, 0.026), (0.27, 0.0)),
                    (1.0, 1.0), (20, 22), 0.0, rings=10, angles=16),
        SegmentSpec("right_hand", "right_lower_arm", point(wrist), arm_axis, z_axis,
                    ((-0.012, 0.0), (0.0, 0.028), (0.06, 0.045), (0.12, 0.035), (0.17, 0.0)),
                    (0.45, 1.0), (3,), -half / 2, rings=8, angles=10),
        SegmentSpec("right_upper_leg", "torso", point(hip), leg_axis, z_axis,
                    ((-0.07, 0.0), (-0.05, 0.07), (0.02, 0.085), (0.22, 0.068), (0.42, 0.05), (0.45, 0.0)),
                    (1.0, 1.0), (9, 7), 0.0, rings=14, angles=16),
        SegmentSpec("right_lower_leg", "right_upper_leg", point(knee), leg_axis, z_axis,
                    ((-0.04, 0.0), (-0.02, 0.05), (0.10, 0.055), (0.36, 0.034), (0.40, 0.0)),
                    (1.0, 1.0), (13, 11), 0.0, rings=12, angles=16),
        SegmentSpec("right_foot", "right_lower_leg", point(ankle), foot_axis, foot_front,
                    ((-0.07, 0.0), (-0.055, 0.033), (0.04, 0.045), (0.17, 0.04), (0.20, 0.0)),
                    (1.0, 0.55), (6,), -whole / 4, rings=8, angles=10),
    )
    return (torso, head, *right, *(mirror_spec(spec) for spec in right))


@dataclass(frozen=True)
class BodyTemplate:
    """The rest-pose mesh. Chart vertices carry (part, U, V); several chart vertices (seams, poles) share one mesh
    vertex. Triangles index chart vertices and are wound counter-clockwise seen from outside."""

    segments: tuple[SegmentSpec, ...]  # parents before children
    mesh_positions: np.ndarray  # (M, 3) float64
    segment_ranges: tuple[tuple[int, int], ...]  # mesh vertex [start, stop) of each segment
    chart_vertex_mesh: np.ndarray  # (C,) int64
    chart_vertex_part: np.ndarray  # (C,) int64, 1..24
    chart_vertex_uv: np.ndarray  # (C, 2) float64
    triangles: np.ndarray  # (T, 3) int64 chart vertex indices
    joint_edges: np.ndarray  # (K, 2) int64 mesh vertex pairs that join a segment to its parent

    @property
    def num_mesh_vertices(self) -> int:
        return len(self.mesh_positions)

    @property
    def triangle_part(self) -> np.ndarray:
        return self.chart_vertex_part[self.triangles[:, 0]]

    def segment_index(self, name: str) -> int:
        for index, spec in enumerate(self.segments):
            if spec.name == name:
                return index
        raise KeyError(f"no body segment named '{name}'")


def _profile_rings(spec: SegmentSpec, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Axial positions and radii of ``count`` rings spaced evenly in arc length along the profile."""
    z_control, r_control = np.asarray(spec.profile, dtype=np.float64).T
    z = np.linspace(z_control[0], z_control[-1], 512)
    r = PchipInterpolator(z_control, r_control)(z)
    arc = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(z), np.diff(r)))])
    targets = np.linspace(0.0, arc[-1], count)
    ring_z, ring_r = np.interp(targets, arc, z), np.interp(targets, arc, r)
    ring_r[[0, -1]] = 0.0
    return ring_z, ring_r


def segment_surface(spec: SegmentSpec, ring_count: int, angle_count: int) -> np.ndarray:
    """(ring_count, angle_count, 3) rest positions: rings from the proximal to the distal pole, angles
    ``chart_start + 2 pi k / angle_count``."""
    ring_z, ring_r = _profile_rings(spec, ring_count)
    theta = spec.chart_start + 2 * math.pi * np.arange(angle_count) / angle_count
    axis, front, side = np.asarray(spec.axis), np.asarray(spec.front), spec.side
    around = (spec.section[0] * np.cos(theta))[:, None] * side + (spec.section[1] * np.sin(theta))[:, None] * front
    return (np.asarray(spec.joint) + ring_z[:, None, None] * axis
            + ring_r[:, None, None] * around[None, :, :])


def _check_spec(spec: SegmentSpec) -> None:
    axis, front = np.asarray(spec.axis), np.asarray(spec.front)
    if abs(np.linalg.norm(axis) - 1) > 1e-9 or abs(np.linalg.norm(front) - 1) > 1e-9 or abs(axis @ front) > 1e-9:
        raise ValueError(f"segment {spec.name}: axis and front must be orthonormal")
    if spec.angles % len(spec.charts):
        raise ValueError(f"segment {spec.name}: {spec.angles} angles do not split into {len(spec.charts)} charts")
    centres = spec.chart_start + 2 * math.pi * (np.arange(spec.angles) + 0.5) / spec.angles
    if np.min(np.abs(np.cos(centres))) < 1e-6:
        raise ValueError(f"segment {spec.name}: a quad is centred on the mirror plane; shift chart_start")


def _build_segment(spec: SegmentSpec, mesh_base: int, chart_base: int
                   ) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """Mesh positions, chart vertex arrays (mesh id, part, u, v) and outward-wound triangles of one segment."""
    _check_spec(spec)
    rings, angles = spec.rings, spec.angles
    grid = segment_surface(spec, rings, angles)
    # Mesh vertices: one per pole, one per (inner ring, angle).
    positions = np.concatenate([grid[0, :1], grid[1:-1].reshape(-1, 3), grid[-1, :1]])
    mesh_id = np.empty((rings, angles), dtype=np.int64)
    mesh_id[0] = mesh_base
    mesh_id[1:-1] = mesh_base + 1 + np.arange((rings - 2) * angles).reshape(rings - 2, angles)
    mesh_id[-1] = mesh_base + 1 + (rings - 2) * angles

    columns = angles // len(spec.charts)
    chart_mesh, chart_part, chart_uv, triangles = [], [], [], []
    ring_index, column_index = np.meshgrid(np.arange(rings), np.arange(columns + 1), indexing="ij")
    for chart_number, part in enumerate(spec.charts):
        first = chart_base + sum(len(m) for m in chart_mesh)
        angle_index = (chart_number * columns + column_index) % angles
        chart_mesh.append(mesh_id[ring_index, angle_index].reshape(-1))
        chart_part.append(np.full(ring_index.size, part, dtype=np.int64))
        chart_uv.append(np.stack([column_index / columns, ring_index / (rings - 1)], axis=-1).reshape(-1, 2))
        vertex = first + ring_index * (columns + 1) + column_index  # chart vertex ids on the (ring, column) grid
        a, b = vertex[:-1, :-1].reshape(-1), vertex[:-1, 1:].reshape(-1)
        c, d = vertex[1:, 1:].reshape(-1), vertex[1:, :-1].reshape(-1)
        # Split each quad along the diagonal the mirror image's quad also uses: mirroring maps theta to pi - theta
        # and a diagonal to the other one, so choose by the sign of cos(theta) at the quad's centre.
        centre = spec.chart_start + 2 * math.pi * (chart_number * columns + column_index[:-1, :-1] + 0.5) / angles
        main = (np.cos(centre) > 0).reshape(-1)
        triangles.append(np.concatenate([
            np.where(main[:, None], np.stack([a, b, c], 1), np.stack([a, b, d], 1)),
            np.where(main[:, None], np.stack([a, c, d], 1), np.stack([b, c, d], 1)),
        ]))
    chart_mesh_all = np.concatenate(chart_mesh)
    triangles_all = np.concatenate(triangles)
    # Triangles touching a pole with two corners there have no area: drop them.
    corners = chart_mesh_all[triangles_all - chart_base]
    keep = (corners[:, 0] != corners[:, 1]) & (corners[:, 1] != corners[:, 2]) & (corners[:, 0] != corners[:, 2])
    triangles_all = triangles_all[keep]
    # Wind outward: the sign depends on the handedness of (side, front, axis), so measure it.
    corner_positions = positions[chart_mesh_all[triangles_all - chart_base] - mesh_base]
    normals = np.cross(corner_positions[:, 1] - corner_positions[:, 0], corner_positions[:, 2] - corner_positions[:, 0])
    centroids = corner_positions.mean(axis=1) - np.asarray(spec.joint)
    radial = centroids - np.outer(centroids @ np.asarray(spec.axis), spec.axis)
    if np.sum(np.einsum("ij,ij->i", normals, radial)) < 0:
        triangles_all = triangles_all[:, [0, 2, 1]]
    chart_arrays = [chart_mesh_all, np.concatenate(chart_part), np.concatenate(chart_uv)]
    return positions, chart_arrays, triangles_all


def _mesh_edges(triangle_mesh: np.ndarray) -> np.ndarray:
    edges = np.concatenate([triangle_mesh[:, [0, 1]], triangle_mesh[:, [1, 2]], triangle_mesh[:, [2, 0]]])
    return np.unique(np.sort(edges, axis=1), axis=0)


def _joint_edges(positions: np.ndarray, child: range, parent: range, tolerance: float) -> np.ndarray:
    """Pairs (child vertex, nearest parent vertex) closer than ``tolerance``: where the child's surface meets its
    parent's. Falls back to the single closest pair so that every segment is reachable."""
    distances = cdist(positions[child.start:child.stop], positions[parent.start:parent.stop])
    nearest = distances.argmin(axis=1)
    close = np.flatnonzero(distances[np.arange(len(nearest)), nearest] < tolerance)
    if len(close) == 0:
        close = np.array([int(np.argmin(distances.min(axis=1)))])
    return np.stack([child.start + close, parent.start + nearest[close]], axis=1)


@functools.lru_cache(maxsize=1)
def build_template() -> BodyTemplate:
    """The rest-pose template (deterministic; cached)."""
    specs = _template_specs()
    names = [spec.name for spec in specs]
    positions, chart_mesh, chart_part, chart_uv, triangles, ranges = [], [], [], [], [], []
    mesh_count = chart_count = 0
    for spec in specs:
        if spec.parent is not None and spec.parent not in names[: names.index(spec.name)]:
            raise ValueError(f"segment {spec.name}: parent {spec.parent} must come before it")
        segment_positions, (mesh_ids, parts, uvs), segment_triangles = _build_segment(spec, mesh_count, chart_count)
        positions.append(segment_positions)
        chart_mesh.append(mesh_ids)
        chart_part.append(parts)
        chart_uv.append(uvs)
        triangles.append(segment_triangles)
        ranges.append((mesh_count, mesh_count + len(segment_positions)))
        mesh_count += len(segment_positions)
        chart_count += len(mesh_ids)
    mesh_positions = np.concatenate(positions)
    chart_vertex_mesh = np.concatenate(chart_mesh)
    all_triangles = np.concatenate(triangles)

    edges = _mesh_edges(chart_vertex_mesh[all_triangles])
    edge_length = np.linalg.norm(mesh_positions[edges[:, 0]] - mesh_positions[edges[:, 1]], axis=1)
    segment_of_edge = np.searchsorted([stop for _, stop in ranges], edges[:, 0], side="right")
    typical_edge = [float(np.median(edge_length[segment_of_edge == k])) for k in range(len(specs))]
    joint_edges = [
        _joint_edges(mesh_positions, range(*ranges[k]), range(*ranges[names.index(spec.parent)]),
                     max(typical_edge[k], typical_edge[names.index(spec.parent)]))
        for k, spec in enumerate(specs) if spec.parent is not None
    ]
    template = BodyTemplate(
        segments=specs,
        mesh_positions=mesh_positions,
        segment_ranges=tuple(ranges),
        chart_vertex_mesh=chart_vertex_mesh,
        chart_vertex_part=np.concatenate(chart_part),
        chart_vertex_uv=np.concatenate(chart_uv),
        triangles=all_triangles,
        joint_edges=np.concatenate(joint_edges),
    )
    _freeze_arrays(template)  # it is cached and shared: nobody may change it in place
    return template


def _freeze_arrays(obj: object) -> None:
    for value in vars(obj).values():
        if isinstance(value, np.ndarray):
            value.flags.writeable = False


# --- evaluation files --------------------------------------------------------------------------------------------
def geodesic_distances(template: BodyTemplate) -> np.ndarray:
    """(M, M) shortest-path distances (meters) over mesh edges and joint edges."""
    edges = np.concatenate([_mesh_edges(template.chart_vertex_mesh[template.triangles]), template.joint_edges])
    positions = template.mesh_positions
    lengths = np.linalg.norm(positions[edges[:, 0]] - positions[edges[:, 1]], axis=1)
    size = template.num_mesh_vertices
    graph = coo_matrix((lengths, (edges[:, 0], edges[:, 1])), shape=(size, size)).tocsr()
    components, _ = connected_components(graph, directed=False)
    if components != 1:
        raise RuntimeError(f"the template body mesh falls into {components} unconnected pieces")
    return shortest_path(graph, method="D", directed=False)


def _evaluation_vertices(template: BodyTemplate) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each chart sampled EVALUATION_SUBDIVISION times finer than the mesh (as SMPL's subdivided vertex table is),
    each sample assigned to the nearest mesh vertex of its segment. Returns part, uv, mesh index."""
    factor = EVALUATION_SUBDIVISION
    parts, uvs, mesh_ids = [], [], []
    for spec, (start, stop) in zip(template.segments, template.segment_ranges, strict=True):
        rings = factor * (spec.rings - 1) + 1
        angles = factor * spec.angles
        surface = segment_surface(spec, rings, angles)
        tree = cKDTree(template.mesh_positions[start:stop])
        columns = angles // len(spec.charts)
        ring_index, column_index = np.meshgrid(np.arange(rings), np.arange(columns + 1), indexing="ij")
        for chart_number, part in enumerate(spec.charts):
            angle_index = (chart_number * columns + column_index) % angles
            _, nearest = tree.query(surface[ring_index, angle_index].reshape(-1, 3))
            mesh_ids.append(start + nearest)
            parts.append(np.full(nearest.size, part, dtype=np.int64))
            uvs.append(np.stack([column_index / columns, ring_index / (rings - 1)], axis=-1).reshape(-1, 2))
    return np.concatenate(parts), np.concatenate(uvs), np.concatenate(mesh_ids)


@functools.lru_cache(maxsize=1)
def build_body_surface() -> BodySurface:
    """The template's GPS evaluation surface, in the layout of DensePose's SMPL evaluation files (cached)."""
    template = build_template()
    part, uv, mesh = _evaluation_vertices(template)
    surface = BodySurface(
        vertex_part=part,
        vertex_uv=uv.astype(np.float32),
        vertex_to_mesh=mesh,
        geodesic=squareform(geodesic_distances(template), checks=False).astype(np.float32),
        num_mesh_vertices=template.num_mesh_vertices,
    )
    _freeze_arrays(surface)
    return surface


def mirror_uv(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Chart coordinates of a point's mirror image, in the mirrored chart (see the module docstring)."""
    return 1.0 - np.asarray(u), np.asarray(v).copy()


def uv_symmetry_tables() -> tuple[np.ndarray, np.ndarray]:
    """(24, 256, 256) U and V tables in the layout of DensePose's ``UV_symmetry_transforms.mat``."""
    grid = np.arange(UV_TABLE_SIZE) / (UV_TABLE_SIZE - 1)
    v, u = np.meshgrid(grid, grid, indexing="ij")  # [row = V, column = U]
    mirrored_u, mirrored_v = mirror_uv(u, v)
    return (np.broadcast_to(mirrored_u, (NUM_FINE_PARTS, *u.shape)).copy(),
            np.broadcast_to(mirrored_v, (NUM_FINE_PARTS, *v.shape)).copy())


# --- posing ------------------------------------------------------------------------------------------------------
def axis_rotation(axis: np.ndarray | tuple[float, float, float], angle: float) -> np.ndarray:
    """Rotation matrix by ``angle`` radians about the unit vector ``axis`` (right-hand rule)."""
    x, y, z = _unit(axis)
    k = np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


def pose_mesh(template: BodyTemplate, rotations: dict[str, np.ndarray], global_rotation: np.ndarray,
              width_scale: float = 1.0) -> np.ndarray:
    """Posed mesh positions (body frame, meters). ``rotations[name]`` turns a segment about its joint, relative to
    its parent (identity when absent); the torso's rotation is applied before ``global_rotation``. ``width_scale``
    stretches the rest body along X and Z (build), before posing."""
    scale = np.array([width_scale, 1.0, width_scale])
    posed = np.empty_like(template.mesh_positions)
    world_rotation: dict[str, np.ndarray] = {}
    world_joint: dict[str, np.ndarray] = {}
    identity = np.eye(3)
    for spec, (start, stop) in zip(template.segments, template.segment_ranges, strict=True):
        joint = np.asarray(spec.joint) * scale
        local = rotations.get(spec.name, identity)
        if spec.parent is None:
            rotation = global_rotation @ local
            position = global_rotation @ joint
        else:
            parent_joint = np.asarray(template.segments[template.segment_index(spec.parent)].joint) * scale
            rotation = world_rotation[spec.parent] @ local
            position = world_joint[spec.parent] + world_rotation[spec.parent] @ (joint - parent_joint)
        world_rotation[spec.name] = rotation
        world_joint[spec.name] = position
        posed[start:stop] = (template.mesh_positions[start:stop] * scale - joint) @ rotation.T + position
    return posed


def mirror_rotations(rotations: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Joint rotations of the mirrored pose: posing with them gives the mirror image (X -> -X) of the pose."""
    return {_mirror_name(name): MIRROR @ rotation @ MIRROR for name, rotation in rotations.items()}
