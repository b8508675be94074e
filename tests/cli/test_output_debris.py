"""Interrupted and refused runs leave no debris: stale temporaries are removed on start and on resume, a refused run
creates no output directory, and only the newest periodic checkpoints stay on disk."""

import pytest

import fnl.cli.quantize
import fnl.cli.train
from fnl.config import ConfigError, load_config
from fnl.engine.checkpoint import checkpoints_kept, save_checkpoint
from fnl.modeling import build_model

pytestmark = [pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions:UserWarning"),
              pytest.mark.filterwarnings("ignore:Please use quant_min and quant_max:UserWarning"),
              pytest.mark.filterwarnings("ignore:must run observer before calling calculate_qparams:UserWarning"),
              pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`:UserWarning")]

# What `kill -9` during torch.save inside fnl.utils.io.atomic_path leaves: a 0-byte hidden temporary.
STALE = ".model_0000001.pth.k2x9_qpa.tmp"
# Files of the user's that merely look alike: never touched.
NOT_OURS = ["notes.tmp", ".model.pth.tmp", "model.pth.abcdefgh.tmp"]


def periodic(directory, prefix=""):
    return sorted(p.name for p in directory.glob(f"{prefix}model_[0-9]*.pth"))


def train(tiny_dataset, output, max_iter, *extra, resume=False):
    return fnl.cli.train.main([*(["--resume"] if resume else []), "--config", "test_tiny", "--output", str(output),
                               "--no-eval",
                               "DATASETS.ROOT", str(tiny_dataset), "SOLVER.MAX_ITER", str(max_iter),
                               "SOLVER.STEPS", "[100]", "SOLVER.CHECKPOINT_PERIOD", "1", "SOLVER.CHECKPOINTS_KEPT",
                               "2", *extra])


def test_training_removes_stale_temporaries_and_keeps_the_newest_checkpoints(tiny_dataset, tmp_path):
    output = tmp_path / "train"
    output.mkdir()
    for name in [STALE, *NOT_OURS]:
        (output / name).write_bytes(b"")
    assert train(tiny_dataset, output, 4) == 0
    assert not (output / STALE).exists() and all((output / name).exists() for name in NOT_OURS)
    assert periodic(output) == ["model_0000001.pth", "model_0000002.pth"]  # of 0, 1, 2 (3 is model_final)

    (output / STALE).write_bytes(b"")
    assert train(tiny_dataset, output, 7, resume=True) == 0  # from model_final (3): saves 4 and 5
    assert not (output / STALE).exists()
    assert periodic(output) == ["model_0000004.pth", "model_0000005.pth"]


@pytest.mark.parametrize("value", ["1", "-2"])
def test_keeping_fewer_than_two_checkpoints_is_refused_naming_the_key(value):
    cfg = load_config("test_tiny", ["QUANTIZATION.CHECKPOINTS_KEPT", value])
    with pytest.raises(ConfigError, match=rf"QUANTIZATION.CHECKPOINTS_KEPT must be 0 .* or at least 2 .*got {value}"):
        checkpoints_kept(cfg, "QUANTIZATION.CHECKPOINTS_KEPT")


def test_refused_runs_create_no_output_directory(tiny_dataset, tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"PK\x03\x04 truncated")
    output = tmp_path / "quantized"
    assert fnl.cli.quantize.main(["--ckpt", str(bad), "--data", str(tiny_dataset), "--output", str(output)]) == 2
    assert "bad.pth is not a readable PyTorch file" in capsys.readouterr().err
    assert not output.exists()
    output = tmp_path / "trained"
    assert train(tiny_dataset, output, 4, "MODEL.WEIGHTS", str(bad)) == 2
    assert not output.exists()
    assert train(tiny_dataset, output, 4, "DATASETS.ROOT", str(tmp_path / "no_dataset")) == 2
    assert not output.exists()


def test_qat_removes_stale_temporaries_and_keeps_the_newest_checkpoints(tiny_dataset, tmp_path, capsys):
    cfg = load_config("test_tiny", ["DATASETS.ROOT", str(tiny_dataset)])
    ckpt = save_checkpoint(tmp_path / "model_final.pth", build_model(cfg), cfg)
    output = tmp_path / "quantized"
    output.mkdir()
    stale = ".qat_model_0000000.pth.0a1b2c3d.tmp"
    (output / stale).write_bytes(b"")
    assert fnl.cli.quantize.main([
        "--ckpt", str(ckpt), "--data", str(tiny_dataset), "--output", str(output), "--iters", "5", "--threads", "1",
        "QUANTIZATION.CHECKPOINT_PERIOD", "1", "QUANTIZATION.CHECKPOINTS_KEPT", "2",
        "QUANTIZATION.CALIBRATION_IMAGES", "2", "QUANTIZATION.FREEZE_BN_ITER", "2",
        "QUANTIZATION.FREEZE_OBSERVER_ITER", "3", "TEST.MAX_IMAGES", "1"]) in (0, 1)
    assert not (output / stale).exists()
    assert periodic(output, "qat_") == ["qat_model_0000002.pth", "qat_model_0000003.pth"]  # of 0..3
