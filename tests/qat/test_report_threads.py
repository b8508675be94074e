"""fnl-quantize --threads sets the threads of the report's latency figures only: QAT and the analyses run with the
process's threads (OMP_NUM_THREADS), so a job pinned to one thread on a busy machine does not spin-wait on two."""

import pytest
import torch

import fnl.cli.quantize
import fnl.qat.report
from fnl.config import load_config
from fnl.engine.checkpoint import save_checkpoint
from fnl.modeling import build_model
from fnl.utils.errors import InvalidArgumentError
from fnl.utils.modules import torch_threads


def test_torch_threads_sets_inside_and_restores_after_an_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="inside"):
        with torch_threads(before + 1):
            assert torch.get_num_threads() == before + 1
            raise RuntimeError("inside")
    assert torch.get_num_threads() == before
    with pytest.raises(InvalidArgumentError, match="threads must be at least 1, got 0"):
        with torch_threads(0):
            pass


def test_quantize_trains_with_the_process_threads_and_times_with_threads(tiny_dataset, tmp_path, monkeypatch):
    cfg = load_config("test_tiny", ["DATASETS.ROOT", str(tiny_dataset)])
    ckpt = save_checkpoint(tmp_path / "model_final.pth", build_model(cfg), cfg)
    seen: dict[str, list[int]] = {"quantize": [], "measure": []}

    def recording(name, function):
        def call(*args, **kwargs):
            seen[name].append(torch.get_num_threads())
            return function(*args, **kwargs)
        return call

    monkeypatch.setattr(fnl.qat.report, "quantize", recording("quantize", fnl.qat.report.quantize))
    monkeypatch.setattr(fnl.qat.report, "measure", recording("measure", fnl.qat.report.measure))
    process_threads = 2
    torch.set_num_threads(process_threads)
    try:
        assert fnl.cli.quantize.main([
            "--ckpt", str(ckpt), "--data", str(tiny_dataset), "--output", str(tmp_path / "q"), "--mode", "ptq",
            "--threads", "1", "QUANTIZATION.CALIBRATION_IMAGES", "2", "TEST.MAX_IMAGES", "1"]) in (0, 1)
        assert seen["quantize"][0] == process_threads
        assert seen["measure"] and set(seen["measure"]) == {1}
        assert torch.get_num_threads() == process_threads
    finally:
        torch.set_num_threads(min(2, torch.get_num_threads()))
