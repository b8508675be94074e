"""Per-layer numerics, sensitivity by AP and the AP budget (fnl.qat.numerics, fnl.qat.sensitivity).

The acceptance test makes one layer of the AP gate's small trained model (tests/assets/gate_float.pth) fragile: the
first conv of the box head gets one output channel whose weights and bias are 1000x larger, and the next conv's
weights for that channel 1000x smaller. ReLU is positively homogeneous, so the float model computes exactly what it
did; int8 cannot: that channel sets the per-tensor activation range of the layer's output, and every other channel
of the box head rounds to zero. Sensitivity must rank the box head first and the budget must keep exactly it float.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

from fnl.qat.sensitivity import (
    LayerGroup,
    Measurement,
    MeasurementStore,
    SensitivityResult,
    SensitivityRun,
    choose_float_groups,
    evaluator_scorer,
    example_inputs,
    float_modules_of,
    format_sensitivity_table,
    layer_groups,
    ptq_quantizer,
    tensor_to_tensor_modules,
)

warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", message="must run observer before calling", category=UserWarning)
warnings.filterwarnings("ignore", message="Please use quant_min and quant_max", category=UserWarning)

OUTLIER = 1000.0
# The groups the acceptance test measures: the fragile one among its neighbours in the data flow (every group of
# the model would take minutes; layer_groups' full list is checked separately).
MEASURED = ("neck", "rpn_head", "box_head", "densepose_head")


def make_box_head_fragile(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` computing the same float function, with an outlier channel in box_head.conv1."""
    fragile = copy.deepcopy(model)
    head = fragile.roi_heads.box_head
    with torch.no_grad():
        head.conv1.weight[0] *= OUTLIER
        head.conv1.bias[0] *= OUTLIER
        head.conv2.weight[:, 0] /= OUTLIER
    return fragile


@pytest.fixture(scope="module")
def fragile_setup(gate_model):
    cfg, model = gate_model
    # The gate model fits its 8 training images: scored there, int8 has to keep what float computes.
    cfg = cfg.clone()
    cfg.merge_from_list(["DATASETS.TEST", ["train"], "QUANTIZATION.CALIBRATION_IMAGES", 4])
    return cfg.freeze(), make_box_head_fragile(model)


def test_the_fragile_model_computes_what_the_gate_model_computes(gate_model, fragile_setup):
    _, model = gate_model
    _, fragile = fragile_setup
    image = example_inputs(fragile_setup[0])
    with torch.no_grad():
        a, b = model(image)[0], fragile(image)[0]
    assert torch.allclose(a["boxes"], b["boxes"], atol=1e-3) and torch.allclose(a["scores"], b["scores"], atol=1e-4)


def test_layer_groups_cover_stem_stages_neck_and_heads(gate_model):
    _, model = gate_model
    names = [group.name for group in layer_groups(model)]
    stages = len(model.backbone.bottom_up.blocks)
    assert names == ["stem", *[f"stage{i}" for i in range(stages)], "neck", "rpn_head", "box_head",
                     "densepose_head", "predictor"]


def test_float_islands_leave_the_hooked_taps_int8_and_wrap_only_tensor_to_tensor_modules(gate_model):
    from fnl.hooks import audit_hooks

    cfg, model = gate_model
    islandable = tensor_to_tensor_modules(model, example_inputs(cfg))
    taps = {record.module for record in audit_hooks(model)}
    everything = float_modules_of(model, ["backbone.bottom_up", "backbone.layers"], islandable)
    assert taps and not taps & set(everything)
    assert not any(tap.startswith(f"{island}.") for tap in taps for island in everything)
    assert "backbone.layers" not in everything  # a ModuleList of BiFPN layers (lists in, lists out)
    assert any(name.startswith("backbone.layers.") for name in everything)


@pytest.mark.slow
def test_sensitivity_ranks_the_fragile_layer_first_and_the_budget_keeps_exactly_it_float(fragile_setup, tmp_path):
    cfg, fragile = fragile_setup
    groups = [group for group in layer_groups(fragile) if group.name in MEASURED]
    torch.manual_seed(0)
    run = SensitivityRun(fragile, groups, ptq_quantizer(fragile, cfg, "eager"), evaluator_scorer(cfg),
                         MeasurementStore(tmp_path, "test"), example_inputs(cfg))
    result = run.run()
    print(format_sensitivity_table(result))
    reference, all_int8 = result.float_scores.scores, result.int8_scores.scores
    assert reference["bbox_AP"] >= 50, reference  # the float model still detects: the outlier changed nothing
    assert result.ranking()[0] == "box_head", format_sensitivity_table(result)

    # A budget the box head alone meets (with half a point to spare) and the all-int8 model misses.
    with_box_head_float = result.all_but["box_head"].scores
    budget = max(reference[m] - with_box_head_float[m] for m in result.metrics) + 0.5
    assert max(reference[m] - all_int8[m] for m in result.metrics) > budget + 5, (reference, all_int8)
    choice = choose_float_groups(run, result, budget)
    assert choice.within_budget and choice.float_groups == ["box_head"], choice
    assert choice.float_modules == ["roi_heads.box_head"]
    assert len(choice.steps) == 2  # all int8, then the verified mix


def test_stored_measurements_are_reused_and_a_changed_fingerprint_measures_again(gate_model, tmp_path):
    cfg, model = gate_model
    groups = [LayerGroup("box_head", ("roi_heads.box_head",)), LayerGroup("rpn_head", ("proposal_generator.rpn_head",))]
    calls: list[list[str]] = []

    def quantizer(float_modules: list[str]) -> torch.nn.Module:
        calls.append(float_modules)
        return model

    def scorer(_: torch.nn.Module) -> dict[str, float]:
        return {"bbox_AP": 50.0 - len(calls), "densepose_AP": 20.0}

    def run(fingerprint: str) -> None:
        SensitivityRun(model, groups, quantizer, scorer, MeasurementStore(tmp_path, fingerprint),
                       example_inputs(cfg)).run()

    run("a")
    assert len(calls) == 1 + 2 * len(groups)  # all int8, then only / all_but per group (float needs no quantizer)
    assert {path.name for path in tmp_path.iterdir()} >= {"float.json", "int8.json", "only__box_head.json",
                                                          "all_but__rpn_head.json"}
    run("a")
    assert len(calls) == 1 + 2 * len(groups)
    run("b")
    assert len(calls) == 2 * (1 + 2 * len(groups))


def test_a_group_naming_no_module_is_refused_in_one_line(gate_model, tmp_path):
    cfg, model = gate_model
    with pytest.raises(ValueError, match="layer group 'x' names no module or modules the model does not have"):
        SensitivityRun(model, [LayerGroup("x", ("roi_heads.nothing",))], lambda m: model, lambda m: {},
                       MeasurementStore(tmp_path, "f"), example_inputs(cfg))


def test_a_negative_budget_is_refused():
    with pytest.raises(ValueError, match="non-negative number of AP points"):
        choose_float_groups(None, None, -1.0)  # type: ignore[arg-type]


def scored(key: str, float_groups: list[str], densepose_ap: float) -> Measurement:
    return Measurement(key, float_groups, [f"{g}.module" for g in float_groups],
                       {"bbox_AP": 50.0, "densepose_AP": densepose_ap})


class ScriptedMixes:
    """A sensitivity run whose mixes score what a table says (what PTQ of model B did: more float groups, worse)."""

    def __init__(self, scores: dict[str, float]) -> None:
        self.scores, self.measured = scores, []

    def measure(self, key: str, float_groups: list[str]) -> Measurement:
        self.measured.append(key)
        return scored(key, float_groups, self.scores[key])


def test_a_budget_no_mix_meets_keeps_the_closest_mix_measured_not_the_last():
    groups = [LayerGroup(name, (f"{name}.module",)) for name in ("a", "b", "c")]
    result = SensitivityResult(groups, scored("float", [], 15.5), scored("int8", [], 14.9),
                               only={g.name: scored(f"only/{g.name}", [], 15.4) for g in groups},
                               all_but={"a": scored("all_but/a", ["a"], 15.1), "b": scored("all_but/b", ["b"], 15.0),
                                        "c": scored("all_but/c", ["c"], 14.95)})
    run = ScriptedMixes({"budget/a+b": 15.25, "budget/a+b+c": 14.8})
    choice = choose_float_groups(run, result, 0.2)  # type: ignore[arg-type]
    assert run.measured == ["budget/a+b", "budget/a+b+c"]  # every group was tried
    assert not choice.within_budget
    assert choice.float_groups == ["a", "b"] and choice.float_modules == ["a.module", "b.module"]
    assert choice.verified.scores["densepose_AP"] == 15.25
    assert choose_float_groups(ScriptedMixes({"budget/a+b": 15.35}), result, 0.2).within_budget  # type: ignore[arg-type]


def test_numerics_match_fused_layers_by_name_and_find_the_fragile_layer_worst(fragile_setup):
    from fnl.data import build_train_loader
    from fnl.qat import QuantizationStages, calibrate, convert, prepare
    from fnl.qat.numerics import layer_numerics

    cfg, fragile = fragile_setup
    stages = QuantizationStages()
    prepared = prepare(fragile, cfg, "ptq", stages)
    calibrate(prepared, iter(build_train_loader(cfg)), 4)
    int8 = convert(prepared, stages)
    rows = layer_numerics(fragile, int8, cfg, "eager", stages.islands, iter(build_train_loader(cfg)), 2)
    by_name = {row.name: row for row in rows}
    fused = by_name["roi_heads.box_head.conv1"]
    assert fused.site == "roi_heads.box_head.conv1_relu"  # conv + ReLU fused: compared at the group's output
    stem = next(row for name, row in by_name.items() if name.endswith("bottom_up.conv_stem"))
    assert stem.site.endswith("bottom_up.bn1")  # conv + BN fused
    assert all(row.elements > 0 for row in rows if row.kind == "layer")
    # The outlier channel itself is represented; every other channel of the box head rounds to zero, so the box
    # head's next layer and the box predictor are where the signal is lost, and nothing upstream of them is.
    ruined = {row.name for row in rows if row.kind == "layer" and row.sqnr_db < 3}
    assert "roi_heads.box_head.conv2" in ruined, [(r.name, r.sqnr_db) for r in rows[:5]]
    assert all(name.startswith(("roi_heads.box_head.", "roi_heads.box_predictor.")) for name in ruined), ruined
    assert math.isfinite(rows[-1].sqnr_db) and rows[-1].sqnr_db > 10


@pytest.mark.slow
def test_a_mixed_model_exports_to_onnx_and_verifies_as_int8(fragile_setup, tmp_path):
    from fnl.export import to_onnx
    from fnl.export.pipeline import split_images
    from fnl.export.verify import INT8, verify_onnx

    cfg, fragile = fragile_setup
    torch.manual_seed(0)
    # The budget's own quantizer, with the island it chose.
    int8_model = ptq_quantizer(fragile, cfg, "eager")(["roi_heads.box_head"])
    images = split_images(cfg, "train", INT8.min_images)
    report = verify_onnx(int8_model, to_onnx(int8_model, tmp_path / "mixed.onnx", images[0]), images, INT8)
    assert report.passed, report.table()


def test_a_negative_ap_budget_is_one_line_before_any_file_is_read(tmp_path, capsys):
    import fnl.cli.quantize

    code = fnl.cli.quantize.main(["--ckpt", str(tmp_path / "missing.pth"), "--output", str(tmp_path / "out"),
                                  "--max-ap-drop", "-1"])
    assert code == 2
    assert capsys.readouterr().err == ("fnl-quantize: error: --max-ap-drop is a number of AP points, 0 or more; "
                                       "got -1.0\n")
    assert not (tmp_path / "out").exists()


def test_sensitivity_groups_are_comma_separated_and_an_unknown_one_lists_the_known(gate_model):
    from fnl.cli.quantize import build_parser
    from fnl.qat.sensitivity import select_groups

    args = build_parser().parse_args(["--ckpt", "m.pth", "--output", "o", "--sensitivity-groups", "box_head,stem",
                                      "TEST.MAX_IMAGES", "10"])
    assert args.sensitivity_groups == ["box_head", "stem"] and args.opts == ["TEST.MAX_IMAGES", "10"]
    _, model = gate_model
    groups = layer_groups(model)
    assert [g.name for g in select_groups(groups, args.sensitivity_groups)] == ["box_head", "stem"]
    with pytest.raises(ValueError, match=r"unknown layer group\(s\) \['head'\]: this model has \['stem', 'stage0'"):
        select_groups(groups, ["head"])
