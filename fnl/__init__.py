"""fnl: DensePose, fast and light.

Mobile Parsing R-CNN (Rakhimov et al., WACV 2021) in float, quantization-aware training to int8, and export.
The pipeline is load -> patch -> fuse -> prepare -> train -> convert -> export -> verify -> report.
"""

__version__ = "0.1.0"
