"""Plain pickles (detectron2's model-zoo .pkl files: numpy arrays in dicts) load without --unsafe-load through a
restricted unpickler; a pickle carrying code is refused by name; --unsafe-load warns before it runs anything."""

import collections
import os
import pickle

import numpy as np
import pytest
import torch

from fnl.engine.checkpoint import CheckpointError, read_checkpoint


class RunsCode:
    """What a hostile pickle carries: a call made while it is read."""

    def __reduce__(self):
        return (os.write, (2, b"payload ran\n"))


def detectron2_weights() -> dict:
    return collections.OrderedDict([("backbone.bottom_up.stem.conv1.weight", np.arange(24, dtype=np.float32)
                                     .reshape(2, 3, 2, 2)),
                                    ("roi_heads.box_predictor.cls_score.bias", np.array([0.5, -1.0], np.float64)),
                                    ("backbone.bottom_up.stem.conv1.norm.num_batches_tracked", np.int64(7))])


def numpy1_names(data: bytes) -> bytes:
    """A protocol-2 pickle naming numpy's module as numpy 1 and Python 2 pickles do (detectron2's released files);
    protocol 2 names globals in newline-ended text, so the rename needs no length fix-up."""
    return data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize(("protocol", "rename"), [(2, numpy1_names), (4, bytes)])
def test_a_detectron2_pkl_loads_without_unsafe_load(protocol, rename, tmp_path):
    weights = detectron2_weights()
    path = tmp_path / "model_final_a54504.pkl"
    path.write_bytes(rename(pickle.dumps({"model": weights, "__author__": "Detectron2 Model Zoo",
                                          "matching_heuristics": True}, protocol=protocol)))
    data = read_checkpoint(path)
    assert data["__author__"] == "Detectron2 Model Zoo"
    assert list(data["model"]) == list(weights)
    for key, array in weights.items():
        assert isinstance(data["model"][key], torch.Tensor)
        assert torch.equal(data["model"][key], torch.from_numpy(np.array(array)))


def test_a_detectron_caffe2_pkl_keeps_its_blobs_without_momenta(tmp_path):
    path = tmp_path / "model_final.pkl"
    path.write_bytes(pickle.dumps({"blobs": {"conv1_w": np.ones((2, 2), np.float32),
                                             "conv1_w_momentum": np.zeros((2, 2), np.float32)}}, protocol=2))
    assert list(read_checkpoint(path)["model"]) == ["conv1_w"]


def test_a_pickle_carrying_code_is_refused_by_name_and_not_run(tmp_path, capfd):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": {"w": np.zeros(2)}, "x": RunsCode()}, protocol=2))
    with pytest.raises(CheckpointError, match=r"evil.pkl is a pickle holding objects other than numpy arrays and "
                                              r"plain containers \(posix.write\), .*--unsafe-load"):
        read_checkpoint(path)
    assert "payload ran" not in capfd.readouterr().err


def test_unsafe_load_warns_before_the_file_runs_anything(tmp_path, capfd):
    path = tmp_path / "trusted.pkl"
    path.write_bytes(pickle.dumps({"model": {"w": np.ones(2, np.float32)}, "x": RunsCode()}, protocol=2))
    data = read_checkpoint(path, allow_unsafe=True)
    assert torch.equal(data["model"]["w"], torch.ones(2))  # a plain pickle, not "Invalid magic number"
    err = capfd.readouterr().err
    warning = f"--unsafe-load: {path} is read with pickle, which runs any code the file holds"
    assert warning in err and "payload ran" in err
    assert err.index(warning) < err.index("payload ran")


def test_unsafe_load_of_a_torch_file_warns_too(tmp_path, capfd):
    path = tmp_path / "model.pth"
    torch.save({"model": {"w": torch.ones(2)}}, path)
    read_checkpoint(path, allow_unsafe=True)
    assert f"--unsafe-load: {path} is read with pickle" in capfd.readouterr().err


def test_a_truncated_pickle_is_called_unreadable_not_unsafe(tmp_path):
    whole = pickle.dumps({"model": detectron2_weights()}, protocol=2)
    path = tmp_path / "cut.pkl"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CheckpointError, match=r"cut.pkl is not a readable pickle \(corrupt or truncated\?\)") as info:
        read_checkpoint(path)
    assert "--unsafe-load" not in str(info.value)
