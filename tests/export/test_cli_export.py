import copy
import shutil

import onnx
import pytest
import torch
from export_testing import SMALL, tiny_config, tiny_model

import fnl.export.onnx
import fnl.export.verify
from fnl.cli.export import main
from fnl.engine.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random-weight model B checkpoint that carries its config, as fnl-train writes them."""
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pth", tiny_model(), tiny_config())


def test_export_writes_a_checked_model_and_verifies_it(checkpoint, tmp_path, capsys):
    assert main(["--ckpt", str(checkpoint), "--format", "onnx", "--output", str(tmp_path), "--verify",
                 "--verify-images", "2"]) == 0
    out = capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["model_fp32.onnx"]  # no temporary file left
    onnx.checker.check_model(str(tmp_path / "model_fp32.onnx"))
    assert "onnx.checker passed" in out and "PASSED (float32 criteria" in out


def test_a_failed_verification_exits_1_with_the_diff_table(checkpoint, tiny_export, tmp_path, capsys, monkeypatch):
    # The checkpoint holds tiny_export's weights: its file stands for the export, which saves tracing again.
    monkeypatch.setattr(fnl.export.onnx, "to_onnx", lambda model, path, *args, **kwargs: shutil.copyfile(
        tiny_export.path, path))
    real_verify = fnl.export.verify.verify_onnx

    def verify_against_a_changed_model(model, *args, **kwargs):
        changed = copy.deepcopy(model)
        with torch.no_grad():
            changed.roi_heads.densepose_predictor.v_lowres.bias += 0.01
        return real_verify(changed, *args, **kwargs)

    monkeypatch.setattr(fnl.export.verify, "verify_onnx", verify_against_a_changed_model)
    code = main(["--ckpt", str(checkpoint), "--config", "test_tiny", "--output", str(tmp_path), "--verify",
                 "--verify-images", "1", *SMALL])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAILED (float32 criteria" in out
    assert [line.split()[0] for line in out.splitlines() if line.endswith("FAIL")] == ["v"]


def test_an_existing_output_needs_force(checkpoint, tmp_path, capsys):
    (tmp_path / "model_fp32.onnx").write_bytes(b"keep me")
    assert main(["--ckpt", str(checkpoint), "--output", str(tmp_path)]) == 2
    assert "model_fp32.onnx already exists; pass --force" in capsys.readouterr().err
    assert (tmp_path / "model_fp32.onnx").read_bytes() == b"keep me"


def test_a_corrupt_checkpoint_is_one_line_naming_it(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    assert main(["--ckpt", str(bad), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fnl-export: error: checkpoint ") and str(bad) in err and len(err.splitlines()) == 1


def test_a_quantized_checkpoint_is_refused_with_the_way_to_export_it(tmp_path, capsys):
    path = tmp_path / "int8.pth"
    torch.save({"model": {"backbone.quant.scale": torch.tensor([0.1]),
                          "backbone.quant.zero_point": torch.tensor([0])}}, path)
    assert main(["--ckpt", str(path), "--config", "test_tiny", "--output", str(tmp_path / "out")]) == 2
    assert "holds a quantized (QAT or int8) model" in capsys.readouterr().err
