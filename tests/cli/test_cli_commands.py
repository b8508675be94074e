"""fnl-train, fnl-eval, fnl-predict, fnl-summary and fnl-gate from the command line: each runs on good input, and on
bad input (a missing file, an unknown config key, a value of the wrong shape) ends with exit status 2 and one line on
stderr, ``PROG: error: ...``, that names what is at fault; never a traceback."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

import fnl.cli.evaluate
import fnl.cli.gate
import fnl.cli.predict
import fnl.cli.summary
import fnl.cli.train
from fnl.config import load_config
from fnl.engine.checkpoint import save_checkpoint
from fnl.modeling import build_model

Main = Callable[[list[str]], int]
PROGS: dict[str, Main] = {"fnl-train": fnl.cli.train.main, "fnl-eval": fnl.cli.evaluate.main,
                          "fnl-predict": fnl.cli.predict.main, "fnl-summary": fnl.cli.summary.main,
                          "fnl-gate": fnl.cli.gate.main}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight tiny model B: these tests check the commands, not the model's accuracy."""
    path = tmp_path_factory.mktemp("ckpt") / "model.pth"
    cfg = load_config("test_tiny")
    torch.manual_seed(0)
    save_checkpoint(path, build_model(cfg), cfg)
    return path


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "person.png"
    Image.new("RGB", (96, 64), (120, 90, 60)).save(path)
    return path


def _results_json(path: Path, box_ap: float, densepose_ap: float) -> str:
    path.write_text(json.dumps({"bbox": {"AP": box_ap}, "densepose": {"AP": densepose_ap}}))
    return str(path)


def _one_error_line(prog: str, stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), stderr
    return lines[0]


# --- good input -----------------------------------------------------------------------------------------------------
def test_summary_prints_parameters_by_part_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert fnl.cli.summary.main(["--config", "test_tiny", "--json", "--input-size", "128"]) == 0
    summary = json.loads(capsys.readouterr().out)
    cfg = load_config("test_tiny")
    assert summary["params_total"] == sum(p.numel() for p in build_model(cfg).parameters())


@pytest.mark.parametrize(("int8_ap", "code"), [((39.5, 5.2), 0), ((38.0, 5.2), 1), ((39.5, 3.9), 1)])
def test_gate_passes_within_the_allowed_drop_and_fails_beyond_it(int8_ap: tuple[float, float], code: int,
                                                                  tmp_path: Path, capsys) -> None:
    float_json = _results_json(tmp_path / "float.json", 40.0, 5.0)
    int8_json = _results_json(tmp_path / "int8.json", *int8_ap)
    assert fnl.cli.gate.main(["--float", float_json, "--int8", int8_json, "--max-drop", "1.0"]) == code
    assert capsys.readouterr().out.rstrip().endswith("PASS" if code == 0 else "FAIL")


def test_eval_scores_a_checkpoint_and_writes_the_json(checkpoint: Path, tiny_dataset: Path, tmp_path: Path,
                                                      capsys) -> None:
    output = tmp_path / "results.json"
    assert fnl.cli.evaluate.main(["--ckpt", str(checkpoint), "--data", str(tiny_dataset), "--threads", "1",
                                  "--json", str(output)]) == 0
    results = json.loads(output.read_text())
    assert {"bbox", "densepose"} <= set(results)
    assert "AP" in capsys.readouterr().out


def test_predict_writes_an_overlay_and_results(checkpoint: Path, image: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    assert fnl.cli.predict.main(["--ckpt", str(checkpoint), "--input", str(image), "--output", str(output)]) == 0
    results = json.loads((output / "results.json").read_text())
    assert [Path(r["file_name"]).name for r in results["images"]] == ["person.png"]
    assert (output / results["images"][0]["overlay"]).is_file()


# --- bad input ------------------------------------------------------------------------------------------------------
def _bad_inputs(tmp: Path, checkpoint: Path, image: Path, dataset: Path) -> list[tuple[str, list[str], str]]:
    """(command, arguments, what the error line must name)."""
    missing = tmp / "missing"
    not_json = tmp / "results.json"
    not_json.write_text("AP 40\n")
    list_json = tmp / "list.json"
    list_json.write_text("[40.0, 5.0]")
    not_onnx = tmp / "model.onnx"
    not_onnx.write_bytes(b"not a model")
    good = _results_json(tmp / "good.json", 40.0, 5.0)
    train = ["--config", "test_tiny", "--output", str(tmp / "train"), "--no-eval", "DATASETS.ROOT", str(dataset)]
    return [
        ("fnl-train", ["--config", str(missing / "a.yaml"), "--output", str(tmp / "train")], str(missing / "a.yaml")),
        ("fnl-train", [*train, "SOLVER.MAX_ITERS", "3"], "unknown config key 'SOLVER.MAX_ITERS'"),
        ("fnl-train", [*train[:-1], str(missing)], str(missing)),
        ("fnl-train", [*train, "MODEL.ANCHOR_GENERATOR.SIZES", "[[32]]"], "MODEL.ANCHOR_GENERATOR"),
        ("fnl-eval", ["--ckpt", str(missing / "m.pth"), "--data", str(dataset)], str(missing / "m.pth")),
        ("fnl-eval", ["--ckpt", str(checkpoint), "--data", str(dataset), "TEST.MAX_IMAGE", "1"],
         "unknown config key 'TEST.MAX_IMAGE'"),
        ("fnl-eval", ["--ckpt", str(checkpoint), "--data", str(missing)], str(missing)),
        ("fnl-eval", ["--onnx", str(not_onnx), "--data", str(dataset)], str(not_onnx)),
        ("fnl-predict", ["--ckpt", str(checkpoint), "--input", str(missing), "--output", str(tmp / "p")],
         str(missing)),
        ("fnl-predict", ["--ckpt", str(missing / "m.pth"), "--input", str(image), "--output", str(tmp / "p")],
         str(missing / "m.pth")),
        ("fnl-predict", ["--ckpt", str(checkpoint), "--input", str(image), "--output", str(tmp / "p"),
                         "MODEL.ROI_HEADS.SCORE_THRESH", "0.1"], "unknown config key 'MODEL.ROI_HEADS.SCORE_THRESH'"),
        ("fnl-summary", ["--config", str(missing / "a.yaml")], str(missing / "a.yaml")),
        ("fnl-summary", ["--config", "test_tiny", "MODEL.NECK.CHANNELS", "64"], "unknown config key"),
        ("fnl-summary", ["--config", "test_tiny", "--input-size", "8"], "--input-size"),
        ("fnl-gate", ["--float", str(missing / "f.json"), "--int8", good], str(missing / "f.json")),
        ("fnl-gate", ["--float", good, "--int8", str(not_json)], str(not_json)),
        ("fnl-gate", ["--float", good, "--int8", str(list_json)], str(list_json)),
        ("fnl-gate", ["--float", good, "--int8", str(missing / "m.pth")], str(missing / "m.pth")),
    ]


BAD_INPUT_IDS = ["train-missing-config", "train-unknown-key", "train-missing-dataset", "train-anchor-sizes-shape",
                 "eval-missing-ckpt", "eval-unknown-key", "eval-missing-dataset", "eval-not-onnx",
                 "predict-missing-input", "predict-missing-ckpt", "predict-unknown-key",
                 "summary-missing-config", "summary-unknown-key", "summary-input-size",
                 "gate-missing-json", "gate-not-json", "gate-json-not-a-mapping", "gate-missing-ckpt"]


@pytest.mark.parametrize("case", range(len(BAD_INPUT_IDS)), ids=BAD_INPUT_IDS)
def test_bad_input_is_one_line_naming_it_with_exit_status_2(case: int, checkpoint: Path, image: Path,
                                                            tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    prog, argv, named = _bad_inputs(tmp_path, checkpoint, image, tiny_dataset)[case]
    code = PROGS[prog](argv)
    line = _one_error_line(prog, capsys.readouterr().err)
    assert code == 2
    assert named in line
