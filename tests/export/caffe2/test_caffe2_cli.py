"""fnl-export --format caffe2."""

from __future__ import annotations

import pytest
from export_testing import tiny_config

from fnl.cli.export import main
from fnl.engine.checkpoint import save_checkpoint
from fnl.export.caffe2.writer import INIT_NET_FILE, PREDICT_NET_FILE, PREDICT_NET_TEXT_FILE


def test_fnl_export_writes_and_verifies_caffe2_files(caffe2_float, tmp_path, capsys):
    checkpoint = tmp_path / "model.pth"
    save_checkpoint(checkpoint, caffe2_float.model, tiny_config())
    output = tmp_path / "caffe2"
    argv = ["--ckpt", str(checkpoint), "--format", "caffe2", "--output", str(output), "--verify", "--verify-images",
            "2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "float32" in printed and "PASSED" in printed
    assert all((output / name).is_file() for name in (PREDICT_NET_FILE, INIT_NET_FILE, PREDICT_NET_TEXT_FILE))
    assert main(argv) == 2  # the files exist: refused without --force
    assert "--force" in capsys.readouterr().err


def test_fnl_export_refuses_caffe2_from_quantize(tmp_path, capsys):
    # caffe2 has no --from-quantize: refused while parsing, in either spelling, before any file is read.
    for argv in (["--from-quantize", str(tmp_path), "--format", "caffe2", "--output", str(tmp_path / "out")],
                 ["caffe2", "--from-quantize", str(tmp_path), "--output", str(tmp_path / "out")]):
        with pytest.raises(SystemExit) as exit_status:
            main(argv)
        assert exit_status.value.code == 2
        assert "--from-quantize is an option of fnl-export onnx|executorch only" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
