import pytest
import torch

from fnl.config import load_config
from fnl.engine.checkpoint import CheckpointError, config_from_checkpoint, load_state, save_checkpoint
from fnl.modeling import build_model

SMALL = ["INPUT.MIN_SIZE_TEST", "128", "MODEL.RPN.POST_NMS_TOPK_TEST", "50"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(1)
    cfg = load_config("mobile_parsing_rcnn_b", SMALL)
    model = build_model(cfg).eval()
    path = save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pth", model, cfg, iteration=41)
    return cfg, model, path


def test_round_trip_gives_identical_outputs(saved, training_batch):
    cfg, model, path = saved
    torch.manual_seed(2)
    restored = build_model(config_from_checkpoint(path)).eval()
    report = load_state(restored, path, strict=True)
    assert not report.missing and not report.unexpected
    inputs = [{"image": training_batch[0]["image"]}]
    with torch.no_grad():
        a, b = model(inputs)[0], restored(inputs)[0]
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])
    assert torch.equal(a["densepose"]["u"], b["densepose"]["u"])


def test_detectron2_layout_and_names(saved):
    _, _, path = saved
    data = torch.load(path, weights_only=True)
    assert data["iteration"] == 41 and "config" in data
    keys = data["model"].keys()
    for prefix in ("backbone.bottom_up.", "proposal_generator.rpn_head.", "roi_heads.box_head.",
                   "roi_heads.box_predictor.", "roi_heads.densepose_head.", "roi_heads.densepose_predictor."):
        assert any(k.startswith(prefix) for k in keys), prefix


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.pth"):
        load_state(torch.nn.Linear(1, 1), tmp_path / "nope.pth")


def test_corrupt_file(saved, tmp_path):
    _, model, path = saved
    broken = tmp_path / "broken.pth"
    broken.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="broken.pth is not a readable PyTorch file"):
        load_state(model, broken)


def test_wrong_shape_names_the_key(saved, tmp_path):
    _, model, path = saved
    data = torch.load(path, weights_only=True)
    data["model"]["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(5, 3136)
    bad = tmp_path / "bad.pth"
    torch.save(data, bad)
    with pytest.raises(CheckpointError, match=r"roi_heads.box_predictor.cls_score.weight: checkpoint \(5, 3136\)"):
        load_state(model, bad)


def test_other_architecture_is_refused(saved, tmp_path):
    _, model, _ = saved
    cfg_a = load_config("mobile_parsing_rcnn_a")
    other = save_checkpoint(tmp_path / "a.pth", build_model(cfg_a), cfg_a)
    with pytest.raises(CheckpointError, match=r"wrong shape|another architecture"):
        load_state(model, other)
    resnet = tmp_path / "resnet.pth"
    torch.save({"model": {"layer1.0.conv1.weight": torch.zeros(3)}}, resnet)
    with pytest.raises(CheckpointError, match="another architecture"):
        load_state(model, resnet)


def test_code_carrying_pickle_is_not_executed(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("owned",))

    evil = tmp_path / "evil.pth"
    torch.save({"model": {}, "x": Payload()}, evil)
    with pytest.raises(CheckpointError, match="--unsafe-load"):
        load_state(torch.nn.Linear(1, 1), evil)


def test_save_is_atomic_and_leaves_no_temp_files(saved):
    _, _, path = saved
    assert [p.name for p in path.parent.iterdir()] == ["model.pth"]


def test_zoo_name_resolves_to_the_model_zoo_folder(saved, tmp_path, monkeypatch):
    from fnl.engine import checkpoint

    _, _, path = saved
    zoo = tmp_path / "model_zoo"
    zoo.mkdir()
    (zoo / "tiny_b.pth").write_bytes(path.read_bytes())
    monkeypatch.setattr(checkpoint, "MODEL_ZOO_DIR", zoo)
    assert checkpoint.resolve_checkpoint("zoo:tiny_b") == zoo / "tiny_b.pth"
    assert checkpoint.zoo_models() == ["tiny_b"]
    assert config_from_checkpoint("zoo:tiny_b").MODEL.NECK.NAME == "BiFPN"
    with pytest.raises(CheckpointError, match="no model 'nope' in the model zoo .*available: tiny_b"):
        checkpoint.read_checkpoint("zoo:nope")


def test_half_precision_weights_load_into_the_float_model(saved, tmp_path):
    cfg, model, _ = saved
    half = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save({"model": half}, tmp_path / "half.pth")
    restored = build_model(cfg)
    load_state(restored, tmp_path / "half.pth", strict=True)
    weight = "roi_heads.box_predictor.cls_score.weight"
    assert restored.state_dict()[weight].dtype == torch.float32
    assert torch.equal(restored.state_dict()[weight], model.state_dict()[weight].half().float())
