"""Mobile Parsing R-CNN in float: timm backbone, FPN/BiFPN neck, RPN, box and DensePose RoI heads."""

from fnl.modeling.densepose import DensePoseOutput, densepose_to_iuv
from fnl.modeling.meta_arch import GeneralizedRCNN, ImageShapeError, build_model

__all__ = ["DensePoseOutput", "GeneralizedRCNN", "ImageShapeError", "build_model", "densepose_to_iuv"]
