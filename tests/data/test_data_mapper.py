import copy
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from fnl.data.build import (
    InferenceSampler,
    TrainingSampler,
    build_test_loader,
    build_train_loader,
    get_dataset_dicts,
)
from fnl.data.catalog import load_split
from fnl.data.densepose_coco import DatasetError
from fnl.data.mapper import DatasetMapper
from fnl.data.transforms import hflip_densepose


def _with_crowd(dataset_dict: dict) -> dict:
    """A copy whose first annotation is made a crowd."""
    changed = copy.deepcopy(dataset_dict)
    changed["annotations"][0]["iscrowd"] = 1
    return changed


def _densepose_dict(dataset_dicts):
    return next(d for d in dataset_dicts if any(a["densepose"] is not None for a in d["annotations"]))


def test_train_mapper_output_contract(synthetic_cfg, synthetic_root):
    dataset_dict = _densepose_dict(load_split(synthetic_root, "train"))
    snapshot = copy.deepcopy(dataset_dict)
    mapper = DatasetMapper(synthetic_cfg, is_train=True)
    out = mapper(dataset_dict, np.random.default_rng(0))

    image = out["image"]
    assert image.dtype == torch.uint8 and image.dim() == 3 and image.shape[0] == 3
    assert min(image.shape[1:]) in synthetic_cfg.INPUT.MIN_SIZE_TRAIN
    assert max(image.shape[1:]) <= synthetic_cfg.INPUT.MAX_SIZE_TRAIN
    assert (out["height"], out["width"]) == (dataset_dict["height"], dataset_dict["width"])
    assert out["image_id"] == dataset_dict["image_id"] and out["file_name"] == dataset_dict["file_name"]
    instances = out["instances"]
    count = len(dataset_dict["annotations"])
    assert instances["boxes"].dtype == torch.float32 and instances["boxes"].shape == (count, 4)
    assert instances["classes"].dtype == torch.int64 and instances["classes"].tolist() == [0] * count
    assert len(instances["densepose"]) == count
    boxes = instances["boxes"]
    assert torch.all(boxes[:, 2] > boxes[:, 0]) and torch.all(boxes[:, 3] > boxes[:, 1])
    for annotation, dp in zip(dataset_dict["annotations"], instances["densepose"], strict=True):
        assert (dp is None) == (annotation["densepose"] is None)
        if dp is None:
            continue
        assert {k: v.dtype for k, v in dp.items()} == {"x": torch.float32, "y": torch.float32, "i": torch.int64,
                                                        "u": torch.float32, "v": torch.float32,
                                                        "segm": torch.uint8}
        assert dp["segm"].shape == (256, 256) and dp["x"].shape == dp["i"].shape
        assert dp["x"].min() >= 0 and dp["x"].max() <= 256
    # Mapping never changes the dataset dict, even when the consumer writes into the outputs.
    for dp in instances["densepose"]:
        if dp is not None:
            dp["segm"].fill_(99)
            dp["i"].fill_(0)
    for before, after in zip(snapshot["annotations"], dataset_dict["annotations"], strict=True):
        if before["densepose"] is not None:
            np.testing.assert_array_equal(before["densepose"]["segm"], after["densepose"]["segm"])
            np.testing.assert_array_equal(before["densepose"]["i"], after["densepose"]["i"])


def test_test_mapper_resizes_and_has_no_instances(synthetic_cfg, synthetic_root):
    dataset_dict = load_split(synthetic_root, "val")[0]
    out = DatasetMapper(synthetic_cfg, is_train=False)(dataset_dict)
    assert "instances" not in out
    assert tuple(out["image"].shape) == (3, 160, 160)
    original = np.asarray(Image.open(dataset_dict["file_name"]).convert("RGB"))
    assert abs(float(out["image"].float().mean()) - float(original.mean())) < 3


def test_boxes_follow_the_resize_and_crowds_are_dropped(synthetic_cfg, synthetic_root):
    dataset_dict = _densepose_dict(load_split(synthetic_root, "train"))
    cfg = synthetic_cfg.clone()
    cfg.INPUT.MIN_SIZE_TRAIN = [64]
    cfg.INPUT.RANDOM_FLIP = "none"
    out = DatasetMapper(cfg, is_train=True)(_with_crowd(dataset_dict))
    assert out["image"].shape[1:] == (64, 64)
    expected = [[x * 0.5, y * 0.5, (x + w) * 0.5, (y + h) * 0.5] for x, y, w, h in
                (a["bbox"] for a in dataset_dict["annotations"][1:])]
    np.testing.assert_allclose(out["instances"]["boxes"].numpy(), np.asarray(expected).reshape(-1, 4), atol=1e-5)
    assert len(out["instances"]["densepose"]) == len(dataset_dict["annotations"]) - 1


def test_flip_in_the_mapper_mirrors_image_boxes_and_densepose(synthetic_cfg, synthetic_root):
    dataset_dict = _densepose_dict(load_split(synthetic_root, "train"))
    cfg = synthetic_cfg.clone()
    cfg.INPUT.MIN_SIZE_TRAIN = [96]
    mapper = DatasetMapper(cfg, is_train=True)
    # With one size to choose from, the mapper's only draw is the flip: rng.random() < 0.5.
    flip_of_seed = {seed: np.random.default_rng(seed).random() < 0.5 for seed in range(10)}
    plain = mapper(dataset_dict, np.random.default_rng(min(s for s, f in flip_of_seed.items() if not f)))
    flipped = mapper(dataset_dict, np.random.default_rng(min(s for s, f in flip_of_seed.items() if f)))
    assert torch.equal(flipped["image"], torch.flip(plain["image"], dims=[2]))
    width = plain["image"].shape[2]
    boxes = plain["instances"]["boxes"]
    expected_boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
    torch.testing.assert_close(flipped["instances"]["boxes"], expected_boxes)
    for before, after in zip(plain["instances"]["densepose"], flipped["instances"]["densepose"], strict=True):
        if before is None:
            assert after is None
            continue
        expected = hflip_densepose({k: v.numpy() for k, v in before.items()}, mapper.transform_data)
        for key, value in expected.items():
            np.testing.assert_allclose(after[key].numpy(), value, atol=1e-5)


def test_image_size_disagreeing_with_the_annotations_is_an_error(synthetic_cfg, synthetic_root):
    dataset_dict = dict(load_split(synthetic_root, "val")[0], height=100)
    with pytest.raises(DatasetError, match=r"image \d+ .*is 128x128 but the annotations say 128x100"):
        DatasetMapper(synthetic_cfg, is_train=False)(dataset_dict)


def test_bad_input_config_is_rejected(synthetic_cfg):
    cfg = synthetic_cfg.clone()
    cfg.INPUT.RANDOM_FLIP = "vertical"
    with pytest.raises(ValueError, match="INPUT.RANDOM_FLIP must be one of"):
        DatasetMapper(cfg, is_train=True)
    cfg = synthetic_cfg.clone()
    cfg.INPUT.FORMAT = "BGR"
    with pytest.raises(ValueError, match="INPUT.FORMAT 'BGR' is not supported"):
        DatasetMapper(cfg, is_train=False)


def test_train_loader_is_endless_seeded_and_batched(synthetic_cfg):
    loader = build_train_loader(synthetic_cfg)
    batches = list(itertools.islice(iter(loader), 5))  # more images than the split holds: it wraps around
    assert all(isinstance(b, list) and len(b) == synthetic_cfg.SOLVER.IMS_PER_BATCH for b in batches)
    assert all("instances" in x for b in batches for x in b)
    again = list(itertools.islice(iter(build_train_loader(synthetic_cfg)), 5))
    for first, second in zip(batches, again, strict=True):
        assert [x["image_id"] for x in first] == [x["image_id"] for x in second]
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, second, strict=True))
    other_seed = synthetic_cfg.clone()
    other_seed.SEED = 1
    reordered = list(itertools.islice(iter(build_train_loader(other_seed)), 5))
    assert [x["image_id"] for b in reordered for x in b] != [x["image_id"] for b in batches for x in b]


def test_worker_processes_do_not_change_the_training_stream(synthetic_cfg):
    in_process = list(itertools.islice(iter(build_train_loader(synthetic_cfg)), 2))
    cfg = synthetic_cfg.clone()
    cfg.DATALOADER.NUM_WORKERS = 1
    with_worker = list(itertools.islice(iter(build_train_loader(cfg)), 2))
    for first, second in zip(in_process, with_worker, strict=True):
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, second, strict=True))


def test_empty_images_are_filtered_from_training(synthetic_cfg, synthetic_root):
    dicts = load_split(synthetic_root, "train")
    dicts[0] = dict(dicts[0], annotations=[])
    cfg = synthetic_cfg.clone()
    cfg.DATASETS.TRAIN = ["train"]
    assert len(get_dataset_dicts(cfg.DATASETS.ROOT, ["train"], filter_empty=True)) <= len(dicts)
    seen = {x["image_id"] for b in itertools.islice(iter(build_train_loader(cfg, dicts)), 6) for x in b}
    assert dicts[0]["image_id"] in seen  # given dicts are used as they are
    with pytest.raises(DatasetError, match="have no images with non-crowd annotations"):
        get_dataset_dicts(cfg.DATASETS.ROOT, [], filter_empty=True)


def test_test_loader_visits_each_image_once_in_order(synthetic_cfg, synthetic_root):
    expected = [d["image_id"] for d in load_split(synthetic_root, "val")]
    batches = list(build_test_loader(synthetic_cfg, "val"))
    assert all(len(b) == 1 for b in batches)
    assert [b[0]["image_id"] for b in batches] == expected
    cfg = synthetic_cfg.clone()
    cfg.TEST.MAX_IMAGES = 1
    assert len(list(build_test_loader(cfg, "val"))) == 1


def test_samplers_shard_across_processes():
    size = 7
    stream = [draw for draw in itertools.islice(iter(TrainingSampler(size, seed=4, rank=0, world_size=1)), 21)]
    shards = [list(itertools.islice(iter(TrainingSampler(size, seed=4, rank=r, world_size=2)), 10)) for r in (0, 1)]
    assert [index for index, _ in stream[:7]] != list(range(7)) and sorted(i for i, _ in stream[:7]) == list(range(7))
    assert shards[0] == stream[0:20:2] and shards[1] == stream[1:21:2]  # disjoint draws of one global stream
    assert len({draw for _, draw in stream}) == len(stream)
    parts = [list(InferenceSampler(size, rank=r, world_size=3)) for r in range(3)]
    assert parts == [[0, 1, 2], [3, 4, 5], [6]]


def test_a_resumed_training_stream_continues_where_the_interrupted_one_stopped():
    full = list(itertools.islice(iter(TrainingSampler(7, seed=4, rank=0, world_size=1)), 30))
    resumed = list(itertools.islice(iter(TrainingSampler(7, seed=4, rank=0, world_size=1, start=12)), 18))
    assert resumed == full[12:]
    shards = [list(itertools.islice(iter(TrainingSampler(7, seed=4, rank=r, world_size=2, start=12)), 9))
              for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == sorted(full[12:])
