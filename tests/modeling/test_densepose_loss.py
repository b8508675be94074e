"""DensePoseLoss on a case small enough to work out by hand: one proposal, 4 x 4 heatmaps that are constant over
space (so bilinear sampling at any interior point gives the constant), three annotated points of which one lies
outside the proposal. Each term's weight is a different number, so a weight on the wrong term shows."""

from __future__ import annotations

import math

import pytest
import torch

from fnl.config import load_config
from fnl.modeling.densepose import DensePoseLoss, DensePoseOutput

W_POINTS, W_PART, W_SEGM = 2.0, 3.0, 7.0
SIZE = 4
GT_BOX = torch.tensor([[0.0, 0.0, 8.0, 8.0]])
PROPOSAL = torch.tensor([[0.0, 0.0, 4.0, 8.0]])  # the left half of the person's box


def _loss(num_coarse: int = 2) -> DensePoseLoss:
    return DensePoseLoss(load_config(None, [
        "MODEL.ROI_DENSEPOSE_HEAD.POINT_REGRESSION_WEIGHTS", str(W_POINTS),
        "MODEL.ROI_DENSEPOSE_HEAD.PART_WEIGHTS", str(W_PART),
        "MODEL.ROI_DENSEPOSE_HEAD.INDEX_WEIGHTS", str(W_SEGM),
        "MODEL.ROI_DENSEPOSE_HEAD.NUM_COARSE_SEGM_CHANNELS", str(num_coarse)]))


def _annotation() -> dict[str, torch.Tensor]:
    # Points are in 0..256 over the GT box [0, 8]^2, so image = point / 32. In the proposal [0, 4] x [0, 8]:
    # (64, 64) -> image (2, 2), inside; (32, 192) -> image (1, 6), inside; (192, 64) -> image (6, 2), outside (dropped;
    # its part 2 and its U, V of 0.9 would change every point term).
    segm = torch.zeros(256, 256, dtype=torch.uint8)
    segm[128:] = 5  # the lower half of the person is part 5
    return {"x": torch.tensor([64.0, 32.0, 192.0]), "y": torch.tensor([64.0, 192.0, 64.0]),
            "i": torch.tensor([1, 3, 2]), "u": torch.tensor([0.6, 0.3, 0.9]), "v": torch.tensor([0.5, 0.5, 0.9]),
            "segm": segm}


def _output(num_coarse: int = 2, foreground_channel: int = 1) -> DensePoseOutput:
    def constant(values: list[float]) -> torch.Tensor:
        return torch.tensor(values).view(1, -1, 1, 1).expand(1, len(values), SIZE, SIZE).clone().requires_grad_()

    coarse = [0.0] * num_coarse
    coarse[foreground_channel] = math.log(3.0)  # p(that channel) = 3 / (3 + num_coarse - 1)
    fine = [0.0] * 25
    fine[1] = math.log(2.0)  # softmax: part 1 gets 2 / 26, every other part 1 / 26
    return DensePoseOutput(coarse_segm=constant(coarse), fine_segm=constant(fine),
                           u=constant([0.1 * p for p in range(25)]), v=constant([float(p) for p in range(25)]))


def test_every_term_and_weight_on_a_hand_computed_case() -> None:
    losses = _loss()(_output(), PROPOSAL, GT_BOX, [_annotation()])
    # I: cross-entropy of parts 1 and 3 under logits (ln 2 on part 1, 0 elsewhere): ln 13 and ln 26, averaged.
    expected_i = (math.log(13.0) + math.log(26.0)) / 2 * W_PART
    # U: estimates 0.1 (part 1), 0.3 (part 3) against 0.6, 0.3: smooth-L1 0.5 * 0.5^2 + 0, summed.
    expected_u = 0.125 * W_POINTS
    # V: estimates 1 and 3 against 0.5, 0.5: 0.5 * 0.5^2 + (2.5 - 0.5) (the linear part beyond 1), summed.
    expected_v = 2.125 * W_POINTS
    # S: the proposal's pixel-centre rows lie at image y = 1, 3, 5, 7: background, background, part 5, part 5. With
    # p(foreground) = 3/4 everywhere, half the pixels cost ln 4 and half ln 4/3; the mean over 16 pixels.
    expected_s = (math.log(4.0) + math.log(4.0 / 3.0)) / 2 * W_SEGM
    actual = {k: v.item() for k, v in losses.items()}
    assert actual == pytest.approx({"loss_densepose_I": expected_i, "loss_densepose_U": expected_u,
                                    "loss_densepose_V": expected_v, "loss_densepose_S": expected_s}, rel=1e-5)


def test_fifteen_coarse_channels_keep_the_part_labels_as_targets() -> None:
    losses = _loss(num_coarse=15)(_output(num_coarse=15, foreground_channel=5), PROPOSAL, GT_BOX, [_annotation()])
    # Logit ln 3 on channel 5 of 15: label 5 costs ln(17/3), label 0 costs ln 17; half the pixels each.
    expected_s = (math.log(17.0 / 3.0) + math.log(17.0)) / 2 * W_SEGM
    assert losses["loss_densepose_S"].item() == pytest.approx(expected_s, rel=1e-5)


def test_points_all_outside_the_proposal_leave_only_the_segmentation_term() -> None:
    annotation = _annotation()
    annotation["x"] = torch.full((3,), 200.0)  # image x = 6.25, right of the proposal
    output = _output()
    losses = _loss()(output, PROPOSAL, GT_BOX, [annotation])
    assert [losses[f"loss_densepose_{k}"].item() for k in "IUV"] == [0.0, 0.0, 0.0]
    assert losses["loss_densepose_S"].item() == pytest.approx((math.log(4.0) + math.log(4.0 / 3.0)) / 2 * W_SEGM)
    sum(losses.values()).backward()  # the zero terms still reach every output, as DDP needs
    assert output.u.grad is not None and not output.u.grad.any()


def test_no_proposals_give_zero_losses_that_stay_in_the_graph() -> None:
    output = _output()[torch.zeros(0, dtype=torch.int64)]
    losses = _loss()(output, torch.zeros(0, 4), torch.zeros(0, 4), [])
    assert [v.item() for v in losses.values()] == [0.0] * 4
    assert all(v.requires_grad for v in losses.values())


def test_two_proposals_each_read_their_own_heatmaps() -> None:
    # The second proposal's heatmaps favour part 2 instead of part 1: the per-point I term of the pair is the mean
    # over both proposals' points, U and V are sums, S is the mean over both proposals' pixels.
    first, second = _output(), _output()
    with torch.no_grad():
        second.fine_segm[:, [1, 2]] = second.fine_segm[:, [2, 1]]
        second.u.mul_(2.0)
    loss = _loss()
    alone = [loss(o, PROPOSAL, GT_BOX, [_annotation()]) for o in (first, second)]
    pair = DensePoseOutput(*(torch.cat([a, b]) for a, b in zip(first.as_dict().values(), second.as_dict().values(),
                                                                  strict=True)))
    together = loss(pair, PROPOSAL.repeat(2, 1), GT_BOX.repeat(2, 1), [_annotation(), _annotation()])
    assert alone[0]["loss_densepose_I"].item() != pytest.approx(alone[1]["loss_densepose_I"].item())
    means = {"loss_densepose_I", "loss_densepose_S"}  # two inside points per proposal: plain means
    for key, value in together.items():
        combined = (alone[0][key] + alone[1][key]) / (2 if key in means else 1)
        assert value.item() == pytest.approx(combined.item(), rel=1e-5), key
