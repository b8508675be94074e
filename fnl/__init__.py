"""fnl: DensePose, fast and light.

Mobile Parsing R-CNN (Rakhimov et al., WACV 2021) in float, quantization-aware training to int8, and export.
The pipeline is load -> patch -> fuse -> prepare -> train -> convert -> export -> verify -> report.

Imports run one way, down this line (a package imports its own modules and the layers to its right; packages in
parentheses share a layer and do not import each other; tests/test_layering.py checks it):

    cli -> export -> qat -> engine -> (modeling, evaluation) -> data -> (config, hooks) -> utils

- cli: the commands, thin wrappers over the layers below.
- export sits above qat: exporting an int8 model needs how it was quantized (the PT2E program, the float islands).
- qat sits above engine: QAT trains with engine's loop and checkpoints, and its report measures with engine's
  benchmark; loading a float-or-int8 checkpoint (``fnl.qat.serialization.load_model_for_inference``) is therefore
  qat's, since an int8 model is rebuilt by patch -> fuse -> prepare -> convert.
- engine: training, inference, checkpoints, the benchmark and the report writer that qat and export both use.
- evaluation sits above data: it reads the dataset's COCO json and the body-surface files that data owns
  (``fnl.data.surface``).
- config, hooks, utils: what every layer may use (``fnl.hooks`` imports nothing else from fnl).

This module imports nothing of fnl, so that ``import fnl`` stays light.
"""

__version__ = "0.1.0"
