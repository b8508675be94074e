"""Errors that point the right way: what the file is, what to pass instead, and a log that says why a run ended."""

import re

import pytest
import torch

import fnl.cli.export
import fnl.cli.quantize
import fnl.cli.train
from fnl.config import load_config
from fnl.engine.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from fnl.modeling import build_model
from fnl.qat import calibrate, convert, prepare, save_int8_checkpoint

SMALL = ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "128"]

pytestmark = [pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions:UserWarning"),
              pytest.mark.filterwarnings("ignore:Please use quant_min and quant_max:UserWarning"),
              pytest.mark.filterwarnings("ignore:must run observer before calling calculate_qparams:UserWarning")]


def test_a_directory_given_as_checkpoint_is_called_a_directory(tmp_path, capsys):
    (tmp_path / "model_final.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"checkpoint {tmp_path} is a directory, not a checkpoint file: pass "
                                              r"one of its files \(model_final.pth\)"):
        read_checkpoint(tmp_path)
    assert fnl.cli.export.main(["--ckpt", str(tmp_path), "--output", str(tmp_path / "out")]) == 2
    assert "is a directory" in capsys.readouterr().err


@pytest.mark.parametrize(("content", "kind"), [
    (b'{"model": {"w": [1, 2]}}', r"a JSON file \(starts with '\{\"model\""),
    (b"MODEL:\n  WEIGHTS: x\n", r"a text file \(starts with 'MODEL:"),
    (b"", r"an empty file"),
    (b"\x08\x07\x12\x07pytorch", r"binary data of another kind \(first bytes 08 07 12 07"),
])
def test_a_file_that_is_no_checkpoint_says_what_it_is_and_not_unsafe_load(content, kind, tmp_path):
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"checkpoint {path} is not a PyTorch checkpoint: it is {kind}") as info:
        read_checkpoint(path)
    assert "--unsafe-load" not in str(info.value)


@pytest.fixture(scope="module")
def int8_dir(tmp_path_factory):
    """What fnl-quantize leaves: the int8 model and the float one beside it."""
    directory = tmp_path_factory.mktemp("quantized")
    cfg = load_config("test_tiny", SMALL)
    torch.manual_seed(0)
    float_model = build_model(cfg).eval()
    save_checkpoint(directory / "model_fp32.pth", float_model, cfg)
    prepared = prepare(float_model, cfg, "ptq")
    images = [[{"image": torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8)}]] * 2
    calibrate(prepared, images, num_images=2)
    save_int8_checkpoint(directory / "model_int8.pth", convert(prepared), cfg, "ptq")
    return directory


def test_an_int8_checkpoint_given_to_quantize_points_to_its_float_one(int8_dir, tmp_path, capsys):
    output = tmp_path / "out"
    # --data names nothing: the checkpoint is judged before any dataset is looked at or generated.
    code = fnl.cli.quantize.main(["--ckpt", str(int8_dir / "model_int8.pth"), "--data", str(tmp_path / "none"),
                                  "--output", str(output)])
    err = capsys.readouterr().err
    assert code == 2
    assert err == (f"fnl-quantize: error: checkpoint {int8_dir / 'model_int8.pth'} is already an int8 model: quantize "
                   f"its float checkpoint (fnl-quantize left it beside this one: {int8_dir / 'model_fp32.pth'})\n")
    assert not output.exists()


def test_a_diverging_run_logs_why_and_resumes_from_weights_that_gave_a_finite_loss(tiny_dataset, tmp_path, capsys):
    output = tmp_path / "train"
    code = fnl.cli.train.main([
        "--config", "test_tiny", "--output", str(output), "--no-eval", "DATASETS.ROOT", str(tiny_dataset),
        "SOLVER.MAX_ITER", "20", "SOLVER.CHECKPOINT_PERIOD", "1", "SOLVER.BASE_LR", "2", "SOLVER.WARMUP_ITERS", "0",
        "SOLVER.CLIP_GRADIENTS", "0.0", "SOLVER.STEPS", "[100]"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fnl-train: error:")]
    assert code == 2 and len(errors) == 1
    err = errors[0]
    failed_at = int(re.search(r"loss is not finite at iteration (\d+)", err).group(1))
    assert failed_at >= 2  # a learning rate of 2 takes a few steps to blow the weights up
    # The checkpoint saved right before the failure holds the weights that gave the non-finite loss; the one before
    # it gave a finite loss. --resume must start from that one.
    good = f"model_{failed_at - 2:07d}.pth"
    assert (output / f"model_{failed_at - 1:07d}.pth").is_file()
    assert (output / "last_checkpoint").read_text() == good
    assert err.endswith(f"the last checkpoint whose weights gave a finite loss is {output / good} (iteration "
                        f"{failed_at - 2}); --resume continues from it")
    weights = read_checkpoint(output / good)["model"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert err in (output / "log.txt").read_text()


def test_a_checkpoint_resumed_from_that_diverges_at_once_stays_the_resume_point(tiny_dataset, tmp_path, capsys):
    output = tmp_path / "train"
    common = ["--config", "test_tiny", "--output", str(output), "--no-eval", "DATASETS.ROOT", str(tiny_dataset),
              "SOLVER.CHECKPOINT_PERIOD", "1", "SOLVER.STEPS", "[100]"]
    assert fnl.cli.train.main([*common, "SOLVER.MAX_ITER", "2"]) == 0
    data = torch.load(output / "model_final.pth", weights_only=True)
    weight = next(k for k, v in data["model"].items() if k.endswith("conv_stem.weight"))
    data["model"][weight] = torch.full_like(data["model"][weight], float("inf"))
    torch.save(data, output / "model_final.pth")
    capsys.readouterr()
    assert fnl.cli.train.main(["--resume", *common, "SOLVER.MAX_ITER", "5"]) == 2
    assert "loss is not finite at iteration 2" in capsys.readouterr().err
    assert "no checkpoint of this run had weights that gave a finite loss" in (output / "log.txt").read_text()
    # Left for the user to decide: --resume must not silently start over from iteration 0.
    assert (output / "last_checkpoint").read_text() == "model_final.pth"
