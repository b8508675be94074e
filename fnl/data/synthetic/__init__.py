"""A synthetic DensePose-COCO dataset: the project's embedded default data (``fnl-data synth``).

No DensePose data can be downloaded here, so fnl renders its own, in exactly the released format, so that one
loader, one trainer and one GPS evaluator serve both the real set and this one.

**The body.** A template surface of about 2,400 mesh vertices, ~1.74 m tall, in meters (so geodesic distances are
in SMPL's units and GPS keeps kappa = 0.255). It is built from 14 surfaces of revolution (torso, head, and per side
upper arm, lower arm, hand, upper leg, lower leg, foot), cut into DensePose's 24 charts with their meaning and
numbering: torso back/front (1, 2), right/left hand (3, 4), left/right foot (5, 6), upper and lower legs and arms
split front/back, head right/left (23, 24). Every vertex carries its chart I and chart coordinates (U, V) spanning
[0, 1]: U runs around the segment's axis across the chart, V along it. Left charts are exact mirror images of right
ones, with (U, V) -> (1 - U, V), so the dataset's ``UV_symmetry_transforms.mat`` is exact.

**The images.** Each image holds 1-5 persons: the template posed (shoulders, elbows, wrists, hips, knees, ankles,
neck and torso turned by random angles; a fifth of them seated), turned to any direction about the vertical axis,
scaled (30-95% of the image height, smaller in crowded images), widened or narrowed, placed anywhere including
across the image border, and stacked in a random depth order so that they occlude each other. They are rendered by
a numpy z-buffer rasteriser (orthographic camera) that interpolates U and V barycentrically, into per-pixel I, U, V
and person index maps. Appearance: a random outfit (top, trousers or shorts, sleeves or bare arms, shoes, skin and
hair colour; hair on the crown and the back of the head tells front from back), a fixed print per chart that varies
with U and V (so the mapping is learnable from the image) at a random contrast, Lambertian shading under a random
light, over random backgrounds (colour fields, shapes including limb-like ellipses, stripes, grain), then a slight
blur and sensor noise. Images are JPEG.

**The annotations**, sampled like the real ones: a tight box of each person's visible pixels (``area`` = their
count, ``iscrowd`` 0); persons with fewer than 20 visible pixels are dropped; persons with at least 150 visible
pixels and a box side of 12 pixels or more get up to 100 points at random visible pixels (``dp_x``/``dp_y`` relative
to the box on its 0..256 grid, ``dp_I`` as floats, ``dp_U``, ``dp_V``) and the 14 coarse part masks on the box's
256x256 grid as compressed COCO RLE (``dp_masks``); the others get a box only.

**The files** (``fnl.data.catalog`` layout): ``annotations/densepose_{train,val}.json``, ``images/{train,val}/``,
``surface/`` with the template's GPS evaluation files (vertex chart table, vertex -> mesh map and geodesic distance
matrix in the layout of DensePose's SMPL files, computed by Dijkstra over mesh edges) and
``surface/UV_symmetry_transforms.mat``, plus ``synth_info.json`` (generator version and arguments). A given seed
yields the same files (with the same library versions), whatever the number of worker processes.
"""

from fnl.data.synthetic.generate import generate_synthetic_dataset, split_sizes

__all__ = ["generate_synthetic_dataset", "split_sizes"]
