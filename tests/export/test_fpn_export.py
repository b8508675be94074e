import torch
from export_testing import random_image

from fnl.config import load_config
from fnl.export import to_onnx, verify_onnx
from fnl.modeling import build_model


def test_fpn_model_a_exports_and_matches_pytorch(tmp_path):
    # Model A's FPN has no norm, so random weights let activations grow into the hundreds and float32 noise past
    # 1e-3; BN statistics measured on random images (what training would do) keep it at the scale of a real model.
    torch.manual_seed(0)
    model = build_model(load_config("mobile_parsing_rcnn_a", ["INPUT.MIN_SIZE_TEST", "128",
                                                              "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
                                                              "MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE", "2"]))
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the batches
    model.train()
    with torch.no_grad():
        images, _ = model.preprocess_image([{"image": random_image(128, 160, seed=k)} for k in range(4)])
        model.backbone(images)
    model.eval()
    path = to_onnx(model, tmp_path / "model_a.onnx", random_image(128, 160))
    report = verify_onnx(model, path, [random_image(150, 200, seed=2)])
    assert report.passed, report.table()
    assert report.rows[0].compared == 2
