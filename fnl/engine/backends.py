"""What fnl knows about each int8 backend, in one place (as torchao's ``Quantizer`` keeps a backend's knowledge in
one class): which parts must stay float on it, which weight scales its int8 kernels run, whether its quantized
transposed conv and 1x1 pooling work. The eager engine (``fnl.qat.quantize``), its patching (``fnl.qat.patch``), the
PT2E engine (``fnl.qat.pt2e``, XNNPACK) and the Caffe2 converter (QNNPACK's Int8 operators) read these policies
instead of testing backend names. Every fact here was measured with torch 2.14 / torchao 0.18 / executorch 1.5.1."""

from __future__ import annotations

from dataclasses import dataclass

from fnl.config import ConfigError

# Weight-scale granularities: one scale per output channel, or one per tensor (QUANTIZATION.WEIGHT_SCALES).
WEIGHT_SCALES = ("per-channel", "per-tensor")


def check_weight_scales(weight_scales: str) -> None:
    """QUANTIZATION.WEIGHT_SCALES, as every backend reads it."""
    if weight_scales not in WEIGHT_SCALES:
        raise ConfigError(f"QUANTIZATION.WEIGHT_SCALES must be one of {WEIGHT_SCALES}, got '{weight_scales}'")


@dataclass(frozen=True)
class BackendPolicy:
    """One int8 backend's abilities, and so what fnl keeps in float for it."""

    name: str
    engine: str  # the quantization engine targeting it: "eager" (torch.ao) or "pt2e" (torchao)
    # Its quantized ConvTranspose2d computes the right values; else the DensePose predictor stays float where it
    # still has transposed convs: int8 checkpoints written before fnl.qat.patch rewrote them as int8 sub-pixel convs.
    transposed_conv: bool
    # It can create a 1x1 max-pool operator (the necks' stride-2 P6 subsampling); else that pool stays float.
    pools_1x1: bool
    # QAT may fake-quantize transposed convs; else they stay float under QAT (PTQ still quantizes them).
    qat_transposed_conv: bool = True
    # The smallest scale its quantization configs allow (observers' eps), where fnl must set it itself.
    min_scale: float | None = None
    # Its int8 global average pooling (an int8 adaptive_avg_pool2d / mean) is right in a program whose batch size
    # changes from call to call; else such a pool runs in float in those programs.
    dynamic_int8_global_pool: bool = True

    def patch_options(self) -> dict[str, bool]:
        """The keyword arguments of ``fnl.qat.patch.patch_for_quantization`` that keep float what this backend
        cannot run in int8."""
        return {"float_predictor": not self.transposed_conv, "float_1x1_pooling": not self.pools_1x1}


# torch.ao eager-mode engines (QUANTIZATION.BACKEND), in the order --backend lists them.
EAGER_BACKENDS: dict[str, BackendPolicy] = {
    # oneDNN: quantized ConvTranspose2d ~100 quanta off (against conv_transpose2d on the dequantized tensors).
    "x86": BackendPolicy("x86", "eager", transposed_conv=False, pools_1x1=True),
    "fbgemm": BackendPolicy("fbgemm", "eager", transposed_conv=True, pools_1x1=True),
    # Quantized ConvTranspose2d wrong with padding; QNNPACK cannot create a 1x1 pooling operator.
    "qnnpack": BackendPolicy("qnnpack", "eager", transposed_conv=False, pools_1x1=False),
}
BACKENDS = tuple(EAGER_BACKENDS)

# ExecuTorch's XNNPACK through PT2E: its int8 deconvolution matches PyTorch's reference, under QAT too (transposed-conv
# weights fake-quantized per output channel, fnl.qat.pt2e.per_channel_fake_quantize); scales below 2^-12 are
# clamped by its observers; its int8 global average pooling computes wrong values for some RoIs once a call has
# more RoIs than an earlier one (the DensePose head's ASPP pooling; docs/NOTES.md).
XNNPACK = BackendPolicy("xnnpack", "pt2e", transposed_conv=True, pools_1x1=True, min_scale=2**-12,
                        dynamic_int8_global_pool=False)

# Caffe2 mobile's Int8 operators: QNNPACK's kernels.
CAFFE2_INT8 = EAGER_BACKENDS["qnnpack"]


def eager_backend(name: str) -> BackendPolicy:
    """The policy of QUANTIZATION.BACKEND ``name``; a ConfigError naming the choices for any other."""
    if name not in EAGER_BACKENDS:
        raise ConfigError(f"QUANTIZATION.BACKEND must be one of {BACKENDS}, got '{name}'")
    return EAGER_BACKENDS[name]
