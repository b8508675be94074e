"""fnl.export.xnnpack_rewrites: the resamplings and parameter scalars XNNPACK could not take, rewritten exactly, so
that the lowered program is XNNPACK delegates only and computes what the program did."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("executorch")
pytest.importorskip("torchao")

from fnl.export.xnnpack_rewrites import parameter_scalars_as_constants, resamplings_as_convs  # noqa: E402


class MiniFusion(nn.Module):
    """What the BiFPN does between convs: 2x nearest up and down, a kernel-1 stride-2 max pool (P6), sums weighted
    by normalized fusion weights computed from a parameter; the DensePose head's ASPP pooling branch (a global pool
    resampled from 1 x 1); and a resampling that is not by 2 (left alone)."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.fine = nn.Conv2d(3, channels, 3, padding=1)
        self.coarse = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.out_fine = nn.Conv2d(channels, channels, 1)
        self.out_coarse = nn.Conv2d(channels, channels, 1)
        self.fusion = nn.Parameter(torch.tensor([0.7, 1.3]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        fine = F.relu(self.fine(x))
        coarse = F.relu(self.coarse(fine))
        w = F.relu(self.fusion)
        w = w / (w.sum() + 1e-4)
        up = w[0] * fine + w[1] * F.interpolate(coarse, size=fine.shape[-2:], mode="nearest")
        context = F.interpolate(F.adaptive_avg_pool2d(coarse, 1), size=coarse.shape[-2:], mode="nearest")
        down = coarse + context + F.interpolate(up, size=coarse.shape[-2:], mode="nearest")
        p6 = F.max_pool2d(down, kernel_size=1, stride=2)
        odd = F.interpolate(p6, size=(5, 7), mode="nearest")
        return self.out_fine(up), self.out_coarse(down), p6, odd


def float_program(args: tuple[torch.Tensor, ...]) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    return torch.export.export(MiniFusion().eval(), args).module()


def int8_program(args: tuple[torch.Tensor, ...]) -> torch.fx.GraphModule:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from fnl.qat.pt2e import xnnpack_quantizer

    prepared = prepare_pt2e(float_program(args), xnnpack_quantizer(qat=False))
    torch.manual_seed(1)
    for _ in range(4):
        prepared(torch.randn_like(args[0]))
    return convert_pt2e(prepared)


def targets(program: torch.fx.GraphModule) -> list[str]:
    return [str(node.target) for node in program.graph.nodes if node.op == "call_function"]


def rewritten(program: torch.fx.GraphModule, args: tuple[torch.Tensor, ...]) -> tuple[torch.fx.GraphModule, int]:
    program = copy.deepcopy(program)
    return program, parameter_scalars_as_constants(program) + resamplings_as_convs(program, args)


@pytest.mark.parametrize("make_program", [float_program, int8_program], ids=["float32", "int8"])
def test_rewrites_are_exact_in_pytorch(make_program) -> None:
    args = (torch.randn(1, 3, 32, 48),)
    program = make_program(args)
    new, count = rewritten(program, args)
    # 2 fusion weights, up, down, from 1 x 1, max pool; the 5 x 7 resampling is not by 2
    assert count == 6
    assert not any("max_pool2d" in target for target in targets(new))
    assert sum("upsample_nearest2d" in target for target in targets(new)) == 1
    torch.manual_seed(2)
    for x in (args[0], torch.randn(1, 3, 32, 48) * 3):
        for before, after in zip(program(x), new(x), strict=True):
            assert torch.equal(before, after)


def test_resampling_rewrite_reads_the_sizes_it_is_given() -> None:
    """Odd sizes make nothing 2x (a max pool of kernel 1 and stride 2 still is the even pixels at any size)."""
    args = (torch.randn(1, 3, 30, 46),)  # fine 30 x 46, coarse 15 x 23: 2x both ways
    assert resamplings_as_convs(copy.deepcopy(float_program(args)), args) == 4
    odd = (torch.randn(1, 3, 29, 45),)  # coarse 15 x 23: not 2x
    program = float_program(odd)
    new = copy.deepcopy(program)
    assert resamplings_as_convs(new, odd) == 2  # the max pool and the one from 1 x 1
    for before, after in zip(program(odd[0]), new(odd[0]), strict=True):
        assert torch.equal(before, after)


def test_dynamic_programs_rewrite_only_the_sizes_they_fix() -> None:
    """A program of dynamic batch (the RoI heads) has every size but the batch fixed: all four are rewritten and it
    stays right at another batch size; with dynamic H and W only the max pool is (2x is not decided by the graph)."""
    from torch.export import Dim

    torch.manual_seed(0)
    module = MiniFusion().eval()
    args = (torch.randn(2, 3, 32, 48),)
    batch = torch.export.export(module, args, dynamic_shapes=({0: Dim("n", min=1, max=8)},)).module()
    new = copy.deepcopy(batch)
    assert resamplings_as_convs(new, args, dynamic=True) == 4
    other = torch.randn(5, 3, 32, 48)
    for before, after in zip(batch(other), new(other), strict=True):
        assert torch.equal(before, after)
    sizes = torch.export.export(module, args, dynamic_shapes=({2: 16 * Dim("h", min=1, max=4),
                                                               3: 16 * Dim("w", min=1, max=4)},)).module()
    assert resamplings_as_convs(copy.deepcopy(sizes), args, dynamic=True) == 1


@pytest.mark.parametrize("make_program", [float_program, int8_program], ids=["float32", "int8"])
def test_lowered_program_is_xnnpack_only_and_matches(make_program) -> None:
    """Lowered by fnl (``xnnpack_program``: rewrites, then XNNPACK's partitioner), every op runs in XNNPACK but the
    resampling that is not by 2 (ExecuTorch's portable kernel), and the ExecuTorch program computes what the PyTorch
    program does (float32 to float rounding, int8 within one output step)."""
    from executorch.runtime import Runtime

    from fnl.export.executorch import xnnpack_program

    args = (torch.randn(1, 3, 32, 48),)
    program = make_program(args)
    _, lowered = xnnpack_program(program, args, None)
    outside = [t for t in targets(lowered.exported_program().graph_module)
               if "executorch_call_delegate" not in t and "getitem" not in t]
    assert len(outside) == 1 and "upsample_nearest2d" in outside[0]
    buffer = lowered.to_executorch().buffer
    loaded = Runtime.get().load_program(buffer)  # kept: the method runs from the program's (and buffer's) memory
    method = loaded.load_method("forward")
    with torch.no_grad():
        expected = program(*args)
    step = max(float(t.abs().max()) for t in expected) / 100  # coarser than one int8 step of these outputs
    for got, want in zip(method.execute(list(args)), expected, strict=True):
        tolerance = 1e-4 if make_program is float_program else step
        assert torch.allclose(got, want, atol=tolerance, rtol=0)
