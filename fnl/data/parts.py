"""DensePose's body-part vocabulary: 24 fine surface charts (the ``I`` of an I/U/V point) and 14 coarse parts (the
labels of ``dp_masks``), with their left/right symmetries as detectron2's ``DensePoseTransformData`` defines them."""

from __future__ import annotations

import numpy as np

NUM_FINE_PARTS = 24
NUM_COARSE_PARTS = 14
# Side of the 256x256 grid that DensePose-COCO's point coordinates and part masks live on, over the person's box.
MASK_SIZE = 256

FINE_PART_NAMES: tuple[str, ...] = (
    "Torso back", "Torso front", "Right hand", "Left hand", "Left foot", "Right foot",
    "Upper leg right back", "Upper leg left back", "Upper leg right front", "Upper leg left front",
    "Lower leg right back", "Lower leg left back", "Lower leg right front", "Lower leg left front",
    "Upper arm left front", "Upper arm right front", "Upper arm left back", "Upper arm right back",
    "Lower arm left front", "Lower arm right front", "Lower arm left back", "Lower arm right back",
    "Head right", "Head left",
)  # FINE_PART_NAMES[i - 1] names chart i

COARSE_PART_NAMES: tuple[str, ...] = (
    "Torso", "Right hand", "Left hand", "Left foot", "Right foot", "Upper leg right", "Upper leg left",
    "Lower leg right", "Lower leg left", "Upper arm left", "Upper arm right", "Lower arm left", "Lower arm right",
    "Head",
)  # COARSE_PART_NAMES[c - 1] names coarse part c

# Index = label before a horizontal flip, value = label after it (index 0 is the background).
POINT_LABEL_SYMMETRIES: tuple[int, ...] = (
    0, 1, 2, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15, 18, 17, 20, 19, 22, 21, 24, 23,
)
MASK_LABEL_SYMMETRIES: tuple[int, ...] = (0, 1, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 14)

# Coarse part of each fine chart (index 0: background).
FINE_TO_COARSE: tuple[int, ...] = (
    0, 1, 1, 2, 3, 4, 5, 6, 7, 6, 7, 8, 9, 8, 9, 10, 11, 10, 11, 12, 13, 12, 13, 14, 14,
)


def fine_to_coarse(fine_labels: np.ndarray) -> np.ndarray:
    """Map an array of fine labels 0..24 to coarse labels 0..14."""
    return np.asarray(FINE_TO_COARSE, dtype=np.uint8)[np.asarray(fine_labels, dtype=np.int64)]
