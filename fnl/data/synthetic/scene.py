"""Synthetic scenes: posed, dressed template bodies over textured backgrounds, rendered to an RGB image and to
per-pixel ground truth (person index, part I, chart coordinates U and V).

Projection is orthographic: image x = origin_x + s * X, image y = origin_y - s * Y, depth = s * Z + offset, with s
the person's pixels per meter. Persons get depth offsets far apart, so one is wholly in front of another.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from fnl.data.parts import NUM_FINE_PARTS
from fnl.data.synthetic.body import (
    MIRROR,
    BodyTemplate,
    axis_rotation,
    mirror_rotations,
    pose_mesh,
)
from fnl.data.synthetic.raster import rasterize

TEMPLATE_HEIGHT_M = 1.74
# Depth offset between persons, in image heights: a posed body is under 2.5 m deep and at most one image height
# tall (~1.74 m), so persons this far apart never interpenetrate.
DEPTH_SPACING = 10.0

# Parts dressed alike. Lower arms and legs follow the top / bottom garment or show skin.
TOP_PARTS = (1, 2, 15, 16, 17, 18)
SLEEVE_PARTS = (19, 20, 21, 22)
BOTTOM_PARTS = (7, 8, 9, 10)
SHIN_PARTS = (11, 12, 13, 14)
SKIN_PARTS = (3, 4, 23, 24)
SHOE_PARTS = (5, 6)
HEAD_RIGHT, HEAD_LEFT = 23, 24

# Every chart has its own fixed print: two sinusoids in U and V whose frequencies and phases depend on the part. It
# is the same for all persons, so a model can read U and V off the texture, but its contrast varies per person and
# lighting, noise and blur hide it, so it cannot rely on the texture alone.
_PRINT_RNG = np.random.default_rng(20210105)
PRINT_FREQUENCY = _PRINT_RNG.integers(1, 4, size=(NUM_FINE_PARTS + 1, 2)).astype(np.float64)
PRINT_PHASE = _PRINT_RNG.uniform(0, 2 * math.pi, size=(NUM_FINE_PARTS + 1, 2))


@dataclass(frozen=True)
class Person:
    rotations: dict[str, np.ndarray]  # local joint rotations by segment name (see body.pose_mesh)
    global_rotation: np.ndarray  # (3, 3) body -> camera
    width_scale: float
    pixels_per_meter: float
    origin: tuple[float, float]  # image (x, y) of the body origin, the floor point between the feet
    depth_offset: float  # larger = nearer the camera
    part_colors: np.ndarray  # (25, 3) base RGB in [0, 1] per chart (row 0 unused); left/right symmetric
    hair_color: np.ndarray  # (3,)
    print_contrast: float


@dataclass(frozen=True)
class SceneRender:
    person: np.ndarray  # (H, W) int64, index into the persons list, -1 for background
    part: np.ndarray  # (H, W) uint8 chart 1..24, 0 for background
    u: np.ndarray  # (H, W) float32
    v: np.ndarray  # (H, W) float32
    normal: np.ndarray  # (H, W, 3) float32 unit surface normal in camera space (toward the camera: +Z)


# --- persons -----------------------------------------------------------------------------------------------------
def sample_rotations(rng: np.random.Generator, template: BodyTemplate) -> dict[str, np.ndarray]:
    """Random joint rotations. Angles are drawn for each side of the body in the right side's conventions and the
    left side's rotations are mirrored, so that the same angles mean the same movement on both sides."""
    def basis(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        spec = template.segments[template.segment_index(name)]
        return spec.side, np.asarray(spec.front), np.asarray(spec.axis)

    def joint(name: str, flexion: float, abduction: float = 0.0, twist: float = 0.0) -> np.ndarray:
        side, front, axis = basis(name)
        # Flexion about the side direction moves the segment toward its front; abduction about the front
        # direction moves a right-side segment outward (toward -X).
        return axis_rotation(front, -abduction) @ axis_rotation(side, flexion) @ axis_rotation(axis, twist)

    rotations = {
        "torso": axis_rotation((1, 0, 0), rng.uniform(-0.1, 0.35)) @ axis_rotation((0, 0, 1), rng.uniform(-0.12, 0.12))
        @ axis_rotation((0, 1, 0), rng.uniform(-0.35, 0.35)),
        "head": axis_rotation((0, 1, 0), rng.uniform(-0.7, 0.7)) @ axis_rotation((1, 0, 0), rng.uniform(-0.3, 0.35)),
    }
    seated = rng.random() < 0.2

    def limbs() -> dict[str, np.ndarray]:
        """One side's limb rotations, in the right side's conventions."""
        hip_flexion = rng.uniform(1.2, 1.7) if seated else rng.uniform(-0.45, 0.6)
        knee_flexion = rng.uniform(1.2, 1.8) if seated else rng.uniform(0.0, 0.9)
        return {
            "right_upper_arm": joint("right_upper_arm", rng.uniform(-0.6, 2.0), rng.uniform(-0.25, 1.7),
                                     rng.uniform(-0.5, 0.5)),
            "right_lower_arm": joint("right_lower_arm", rng.uniform(0.0, 2.3)),
            "right_hand": joint("right_hand", rng.uniform(-0.5, 0.5), rng.uniform(-0.3, 0.3)),
            "right_upper_leg": joint("right_upper_leg", hip_flexion, rng.uniform(-0.08, 0.45), rng.uniform(-0.3, 0.3)),
            "right_lower_leg": joint("right_lower_leg", -knee_flexion),  # knees bend backward
            "right_foot": joint("right_foot", rng.uniform(-0.3, 0.4)),
        }

    rotations.update(limbs())
    rotations.update(mirror_rotations(limbs()))
    return rotations


def _sample_outfit(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    def garment() -> np.ndarray:
        hue = rng.uniform(0, 1)
        saturation = rng.uniform(0.0, 0.85)
        value = rng.uniform(0.15, 0.95)
        return _hsv_to_rgb(hue, saturation, value)

    skin = np.array([0.95, 0.78, 0.65]) * (1 - rng.uniform(0, 0.7)) + rng.normal(0, 0.03, 3)
    top, bottom, shoes = garment(), garment(), garment()
    colors = np.zeros((NUM_FINE_PARTS + 1, 3))
    colors[list(TOP_PARTS)] = top
    colors[list(SLEEVE_PARTS)] = top if rng.random() < 0.5 else skin
    colors[list(BOTTOM_PARTS)] = bottom
    colors[list(SHIN_PARTS)] = bottom if rng.random() < 0.65 else skin
    colors[list(SKIN_PARTS)] = skin
    colors[list(SHOE_PARTS)] = shoes
    hair = _hsv_to_rgb(rng.uniform(0.02, 0.12), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.7))
    return np.clip(colors, 0, 1), hair


def _hsv_to_rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    k = (np.array([5.0, 3.0, 1.0]) + hue * 6) % 6
    return value - value * saturation * np.clip(np.minimum(k, 4 - k), 0, 1)


def sample_person(rng: np.random.Generator, template: BodyTemplate, image_height: int, image_width: int,
                  height_fraction: float, depth_rank: int) -> Person:
    """A random person whose body spans about ``height_fraction`` of the image height, centred at a random place
    (possibly cut by the image border)."""
    rotations = sample_rotations(rng, template)
    global_rotation = (axis_rotation((0, 1, 0), rng.uniform(0, 2 * math.pi))
                       @ axis_rotation((0, 0, 1), rng.uniform(-0.1, 0.1)))
    width_scale = rng.uniform(0.85, 1.2)
    pixels_per_meter = height_fraction * image_height / TEMPLATE_HEIGHT_M
    posed = pose_mesh(template, rotations, global_rotation, width_scale)
    x, y = pixels_per_meter * posed[:, 0], -pixels_per_meter * posed[:, 1]
    centre_x = rng.uniform(-0.05, 1.05) * image_width
    centre_y = rng.uniform(0.2, 0.8) * image_height
    origin = (centre_x - (x.min() + x.max()) / 2, centre_y - (y.min() + y.max()) / 2)
    colors, hair = _sample_outfit(rng)
    return Person(
        rotations=rotations,
        global_rotation=global_rotation,
        width_scale=width_scale,
        pixels_per_meter=pixels_per_meter,
        origin=(float(origin[0]), float(origin[1])),
        depth_offset=float(depth_rank * DEPTH_SPACING * image_height),
        part_colors=colors,
        hair_color=hair,
        print_contrast=float(rng.uniform(0.15, 0.5)),
    )


def mirror_person(person: Person, image_width: int) -> Person:
    """The person as seen in the horizontally flipped image: mirrored pose, origin mirrored about the image's
    vertical centre line. (Outfits are left/right symmetric, so colours stay.)"""
    return replace(
        person,
        rotations=mirror_rotations(person.rotations),
        global_rotation=MIRROR @ person.global_rotation @ MIRROR,
        origin=(image_width - person.origin[0], person.origin[1]),
    )


# --- rendering ---------------------------------------------------------------------------------------------------
def project(template: BodyTemplate, person: Person) -> tuple[np.ndarray, np.ndarray]:
    """Camera-space mesh positions (x, y in pixels, z = depth) and the posed mesh (meters, body frame)."""
    posed = pose_mesh(template, person.rotations, person.global_rotation, person.width_scale)
    s = person.pixels_per_meter
    camera = np.stack([person.origin[0] + s * posed[:, 0], person.origin[1] - s * posed[:, 1],
                       person.depth_offset + s * posed[:, 2]], axis=1)
    return camera, posed


def _vertex_normals(posed: np.ndarray, triangle_mesh: np.ndarray) -> np.ndarray:
    corners = posed[triangle_mesh]
    face = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])  # area-weighted, outward
    normals = np.zeros_like(posed)
    for corner in range(3):
        for axis in range(3):
            normals[:, axis] += np.bincount(triangle_mesh[:, corner], weights=face[:, axis], minlength=len(posed))
    return normals / np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)


def render_people(template: BodyTemplate, persons: list[Person], height: int, width: int) -> SceneRender:
    """Per-pixel person index, part, U, V and normal of the nearest visible surface."""
    triangle_mesh = template.chart_vertex_mesh[template.triangles]
    triangle_uv = template.chart_vertex_uv[template.triangles]  # (T, 3, 2)
    triangle_part = template.triangle_part
    if not persons:
        empty = np.zeros((height, width), dtype=np.float32)
        return SceneRender(np.full((height, width), -1, dtype=np.int64), np.zeros((height, width), dtype=np.uint8),
                           empty, empty.copy(), np.zeros((height, width, 3), dtype=np.float32))
    xy, depth, normals, owner, kept = [], [], [], [], []
    for index, person in enumerate(persons):
        camera, posed = project(template, person)
        corners = camera[triangle_mesh]
        # Image y points down, so a triangle facing the camera (+Z) winds clockwise on screen.
        facing = ((corners[:, 1, 0] - corners[:, 0, 0]) * (corners[:, 2, 1] - corners[:, 0, 1])
                  - (corners[:, 2, 0] - corners[:, 0, 0]) * (corners[:, 1, 1] - corners[:, 0, 1])) < 0
        front = np.flatnonzero(facing)
        xy.append(corners[front, :, :2])
        depth.append(corners[front, :, 2])
        normals.append(_vertex_normals(posed, triangle_mesh)[triangle_mesh[front]])
        owner.append(np.full(len(front), index))
        kept.append(front)
    triangle_index, weights = rasterize(np.concatenate(xy), np.concatenate(depth), height, width)
    covered = triangle_index >= 0
    hit = triangle_index[covered]
    template_triangle = np.concatenate(kept)[hit]
    person_map = np.full((height, width), -1, dtype=np.int64)
    person_map[covered] = np.concatenate(owner)[hit]
    part_map = np.zeros((height, width), dtype=np.uint8)
    part_map[covered] = triangle_part[template_triangle]
    uv = np.einsum("nk,nkc->nc", weights[covered], triangle_uv[template_triangle])
    u_map = np.zeros((height, width), dtype=np.float32)
    v_map = np.zeros((height, width), dtype=np.float32)
    u_map[covered], v_map[covered] = np.clip(uv[:, 0], 0, 1), np.clip(uv[:, 1], 0, 1)
    normal = np.einsum("nk,nkc->nc", weights[covered], np.concatenate(normals)[hit])
    # Body frame has Y up; camera space has image y down: flip the normal's y to match the image.
    normal = normal * np.array([1.0, -1.0, 1.0])
    normal_map = np.zeros((height, width, 3), dtype=np.float32)
    normal_map[covered] = normal / np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-12)
    return SceneRender(person_map, part_map, u_map, v_map, normal_map)


# --- appearance --------------------------------------------------------------------------------------------------
def _hair(part: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Hair covers the top of the head and its back, leaving the face: it tells front from back."""
    # Chart 24 (head left) runs from the back (U = 0) to the front, chart 23 from the front to the back; V = 0 at
    # the neck and 1 at the crown.
    backness = np.where(part == HEAD_LEFT, 1.0 - u, u)
    return ((part == HEAD_LEFT) | (part == HEAD_RIGHT)) & ((v > 0.72) | ((v > 0.4) & (backness > 0.55)))


def shade_people(render: SceneRender, persons: list[Person], rng: np.random.Generator) -> tuple[np.ndarray,
                                                                                                 np.ndarray]:
    """RGB in [0, 1] of the covered pixels (in ``render.person >= 0`` order) and the mask of covered pixels."""
    covered = render.person >= 0
    who = render.person[covered]
    part = render.part[covered].astype(np.int64)
    u, v = render.u[covered].astype(np.float64), render.v[covered].astype(np.float64)
    colors = np.stack([p.part_colors for p in persons])[who, part]
    hair = _hair(part, u, v)
    colors[hair] = np.stack([p.hair_color for p in persons])[who[hair]]
    pattern = 0.5 + 0.25 * np.sin(2 * math.pi * PRINT_FREQUENCY[part, 0] * u + PRINT_PHASE[part, 0]) \
        + 0.25 * np.sin(2 * math.pi * PRINT_FREQUENCY[part, 1] * v + PRINT_PHASE[part, 1])
    contrast = np.array([p.print_contrast for p in persons])[who] * np.where(hair, 0.3, 1.0)
    light = np.array([rng.uniform(-0.8, 0.8), rng.uniform(-0.9, 0.3), 1.0])
    light /= np.linalg.norm(light)
    ambient = rng.uniform(0.3, 0.55)
    diffuse = np.clip(render.normal[covered] @ light, 0.0, 1.0)
    shading = ambient + (1.0 - ambient) * diffuse
    rgb = colors * (1.0 - contrast + contrast * pattern)[:, None] * shading[:, None]
    return rgb, covered


def sample_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H, W, 3) in [0, 1]: a smooth colour field, random shapes (some limb-like), stripes and grain."""
    cells = int(rng.integers(2, 9))
    coarse = (rng.uniform(0, 1, (cells, cells, 3)) * 255).astype(np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.float64)
    background = field / 255.0 * rng.uniform(0.3, 1.0) + rng.uniform(0, 0.5, 3) * rng.uniform(0, 1)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    for _ in range(int(rng.integers(0, 12))):
        color = rng.uniform(0, 1, 3)
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(0.02, 0.3) * height, rng.uniform(0.02, 0.3) * width
        angle = rng.uniform(0, math.pi)
        dy, dx = rows - cy, cols - cx
        along = (dx * math.cos(angle) + dy * math.sin(angle)) / rx
        across = (-dx * math.sin(angle) + dy * math.cos(angle)) / ry
        shape = (along**2 + across**2 <= 1) if rng.random() < 0.6 else (np.abs(along) <= 1) & (np.abs(across) <= 1)
        alpha = rng.uniform(0.5, 1.0)
        background[shape] = (1 - alpha) * background[shape] + alpha * color
    if rng.random() < 0.4:
        angle, period = rng.uniform(0, math.pi), rng.uniform(4, 40)
        stripes = np.sin(2 * math.pi * (cols * math.cos(angle) + rows * math.sin(angle)) / period)
        background += rng.uniform(0.03, 0.2) * stripes[..., None] * rng.uniform(-1, 1, 3)
    background += rng.normal(0, rng.uniform(0, 0.05), background.shape)
    return np.clip(background, 0, 1)


def compose_image(render: SceneRender, persons: list[Person], rng: np.random.Generator) -> np.ndarray:
    """The (H, W, 3) uint8 RGB image: background, shaded people, slight blur and sensor noise."""
    height, width = render.person.shape
    image = sample_background(rng, height, width)
    if persons:
        rgb, covered = shade_people(render, persons, rng)
        image[covered] = rgb
    image = gaussian_filter(image, sigma=(rng.uniform(0.3, 0.9),) * 2 + (0,))
    image += rng.normal(0, rng.uniform(0.004, 0.03), image.shape)
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)


def sample_scene(rng: np.random.Generator, template: BodyTemplate, image_size: int, max_persons: int = 5
                 ) -> tuple[np.ndarray, SceneRender, list[Person]]:
    """1..max_persons people at random sizes, places and depth order; returns image, render and the persons."""
    count = int(rng.integers(1, max_persons + 1))
    depth_ranks = rng.permutation(count)
    persons = []
    for k in range(count):
        # Crowded images hold smaller people, as photographs do.
        height_fraction = rng.uniform(0.3, 0.95) / (1 + 0.12 * (count - 1))
        persons.append(sample_person(rng, template, image_size, image_size, height_fraction, int(depth_ranks[k])))
    render = render_people(template, persons, image_size, image_size)
    return compose_image(render, persons, rng), render, persons
