"""Sensitivity by AP: which layer groups cost accuracy in int8, and the float islands that fit an AP budget.

A *layer group* is a named list of modules of the float model (stem, each backbone stage, neck, RPN head, box head,
DensePose head, predictor: ``layer_groups``). Keeping a group float is done with the existing machinery: its modules
become ``QUANTIZATION.FLOAT_MODULES`` entries (float islands of ``fnl.qat.patch``). Two measurements per group:
- ``only``: only this group int8, every other group float (what int8 does to this group alone);
- ``all_but``: everything int8 except this group (what keeping this group float buys back).
Each configuration is prepared, calibrated (PTQ: the sensitivity of a layer to int8 is a property of its ranges, and
QAT per configuration would cost a training run each), converted and scored by the caller's scorer (the evaluator).
Every result is one JSON file written atomically and skipped when present with the same fingerprint, so an
interrupted run resumes where it stopped.

The budget (``choose_float_groups``): groups are made float greedily in the order of what keeping them float buys
back (``all_but``), each step verified by scoring the mix, until the int8 model is within ``max_drop`` points of
float32 on every metric.

Hooked modules stay int8. The BiFPN's taps are forward pre-hooks on timm's ``conv_pwl``: inside a float island they
would hand the neck float tensors where it takes int8 ones. A group's islands are therefore its largest submodules
that hold no hooked module (``float_modules_of``); the hooked convs themselves stay int8.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from fnl.engine.inference import evaluate_predictor
from fnl.hooks import audit_hooks
from fnl.qat.patch import active_regions
from fnl.qat.pipeline import quantize
from fnl.utils.errors import InvalidArgumentError
from fnl.utils.io import atomic_path, write_json_atomic
from fnl.utils.modules import eval_mode

logger = logging.getLogger("fnl")

METRICS = ("bbox_AP", "densepose_AP")
DIRECTIONS = ("only", "all_but")
# Scores an int8 (or float) model: {metric: value in points}, the keys of METRICS (or the caller's metrics).
Scorer = Callable[[nn.Module], dict[str, float]]
# Builds the int8 model of a float model with the given QUANTIZATION.FLOAT_MODULES.
Quantizer = Callable[[list[str]], nn.Module]


@dataclass(frozen=True)
class LayerGroup:
    name: str
    modules: tuple[str, ...]  # module names of the float model


def _present(model: nn.Module, names: Iterable[str]) -> tuple[str, ...]:
    found = []
    for name in names:
        try:
            model.get_submodule(name)
        except AttributeError:
            continue
        found.append(name)
    return tuple(found)


def layer_groups(model: nn.Module) -> list[LayerGroup]:
    """The groups of a GeneralizedRCNN: stem, each backbone stage, neck, RPN head, box head, DensePose head,
    predictor. Stages are timm's ``blocks.<i>`` (or ResNet's ``layer<i>``); the stem is everything of the bottom-up
    network outside the stages; the neck is everything of the backbone outside the bottom-up network."""
    groups = []
    bottom_up = model.backbone.bottom_up
    stage_parent = "blocks" if hasattr(bottom_up, "blocks") else ""
    stage_names = ([f"blocks.{i}" for i in range(len(bottom_up.blocks))] if stage_parent
                   else [name for name, _ in bottom_up.named_children() if name.startswith("layer")])
    stem = [name for name, child in bottom_up.named_children()
            if name != stage_parent and name not in stage_names and any(True for _ in child.parameters())]
    if stem:
        groups.append(LayerGroup("stem", tuple(f"backbone.bottom_up.{name}" for name in stem)))
    groups += [LayerGroup(f"stage{i}", (f"backbone.bottom_up.{name}",)) for i, name in enumerate(stage_names)]
    neck = tuple(f"backbone.{name}" for name, _ in model.backbone.named_children() if name != "bottom_up")
    if neck:
        groups.append(LayerGroup("neck", neck))
    for name, modules in (("rpn_head", ("proposal_generator.rpn_head",)), ("box_head", ("roi_heads.box_head",)),
                          ("densepose_head", ("roi_heads.densepose_head",)),
                          ("predictor", ("roi_heads.box_predictor", "roi_heads.densepose_predictor"))):
        present = _present(model, modules)
        if present:
            groups.append(LayerGroup(name, present))
    return groups


def check_groups(model: nn.Module, groups: Sequence[LayerGroup]) -> None:
    """Every group names modules of ``model``, and group names are unique: one line otherwise."""
    names = [group.name for group in groups]
    if len(set(names)) != len(names):
        raise InvalidArgumentError(f"layer group names must be unique, got {names}")
    for group in groups:
        missing = [name for name in group.modules if not _present(model, [name])]
        if missing or not group.modules:
            raise InvalidArgumentError(f"layer group '{group.name}' names no module or modules the model does "
                                       f"not have: {missing}")


@torch.no_grad()
def tensor_to_tensor_modules(model: nn.Module, example_inputs: list[dict]) -> set[str]:
    """Names of the modules that, in one forward of ``model`` on ``example_inputs``, returned a single tensor from
    tensor arguments on every call: what a float island can wrap (it quantizes one output tensor)."""
    calls: dict[str, bool] = {}
    names = {module: name for name, module in model.named_modules()}

    def record(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        single = isinstance(output, torch.Tensor) and all(isinstance(a, torch.Tensor) for a in args)
        calls[names[module]] = calls.get(names[module], True) and single

    handles = [module.register_forward_hook(record) for module in names]
    try:
        with eval_mode(model):
            model(example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return {name for name, single in calls.items() if single}


def float_modules_of(model: nn.Module, roots: Iterable[str], islandable: set[str]) -> list[str]:
    """QUANTIZATION.FLOAT_MODULES that keep ``roots`` float: each root, or where it holds a module with user hooks
    or is not one an island can wrap (``islandable``, from ``tensor_to_tensor_modules``; a region's last module
    always can), its largest submodules that are (the hooked modules stay int8, see the module docstring)."""
    hooked = {record.module for record in audit_hooks(model)}
    region_outputs = {region.modules[-1] for region in active_regions(model) if region.exit_reason is not None}

    def holds_hook(name: str) -> bool:
        return any(h == name or h.startswith(f"{name}.") for h in hooked)

    islands: list[str] = []

    def visit(name: str) -> None:
        module = model.get_submodule(name)
        if not holds_hook(name) and (name in islandable or name in region_outputs):
            if any(True for _ in module.parameters()):
                islands.append(name)  # a module without weights (ReLU, Identity) has nothing to keep float
            return
        if name in hooked:
            return
        for child, _ in module.named_children():
            visit(f"{name}.{child}")

    for root in roots:
        visit(root)
    return islands


def group_float_modules(model: nn.Module, groups: Iterable[LayerGroup], islandable: set[str]) -> list[str]:
    return float_modules_of(model, [name for group in groups for name in group.modules], islandable)


@dataclass
class Measurement:
    """The scores of one configuration: which groups were float, and the islands that made them so."""

    key: str  # "float", "int8", "only/<group>", "all_but/<group>", "budget/<g1>+<g2>..."
    float_groups: list[str]
    float_modules: list[str]
    scores: dict[str, float]
    fingerprint: str = ""


def drop(reference: dict[str, float], scores: dict[str, float], metrics: Sequence[str]) -> float:
    """The largest loss, in points, of ``scores`` against ``reference`` over ``metrics`` (negative: a gain)."""
    return max(reference[m] - scores[m] for m in metrics)


@dataclass
class SensitivityResult:
    groups: list[LayerGroup]
    float_scores: Measurement
    int8_scores: Measurement
    only: dict[str, Measurement] = field(default_factory=dict)
    all_but: dict[str, Measurement] = field(default_factory=dict)
    metrics: tuple[str, ...] = METRICS

    def ranking(self) -> list[str]:
        """Groups, most sensitive first: by what keeping the group float buys back (the all-int8 model's loss minus
        the loss with that group float), then by the loss when only that group is int8."""
        reference = self.float_scores.scores
        all_int8 = drop(reference, self.int8_scores.scores, self.metrics)

        def key(name: str) -> tuple[float, float]:
            regained = all_int8 - drop(reference, self.all_but[name].scores, self.metrics)
            alone = drop(reference, self.only[name].scores, self.metrics)
            return -regained, -alone

        return sorted((group.name for group in self.groups), key=key)

    def to_json(self) -> dict[str, Any]:
        return {"metrics": list(self.metrics), "groups": [asdict(g) for g in self.groups],
                "float": asdict(self.float_scores), "int8": asdict(self.int8_scores),
                "only": {k: asdict(v) for k, v in self.only.items()},
                "all_but": {k: asdict(v) for k, v in self.all_but.items()}, "ranking": self.ranking()}


class MeasurementStore:
    """One JSON file per configuration under ``directory``; a file with the same fingerprint is reused."""

    def __init__(self, directory: str | Path, fingerprint: str) -> None:
        self.directory = Path(directory)
        self.fingerprint = fingerprint

    def path(self, key: str) -> Path:
        return self.directory / (key.replace("/", "__").replace("+", "_") + ".json")

    def load(self, key: str) -> Measurement | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            measurement = Measurement(**data)
        except (ValueError, TypeError):
            logger.warning("sensitivity: %s is unreadable, measuring again", path)
            return None
        return measurement if measurement.fingerprint == self.fingerprint else None

    def save(self, measurement: Measurement) -> None:
        measurement.fingerprint = self.fingerprint
        write_json_atomic(self.path(measurement.key), asdict(measurement))


def fingerprint(*parts: str | bytes) -> str:
    """What a stored measurement depends on (config text, checkpoint bytes): a stale file is measured again."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
    return digest.hexdigest()[:16]


class SensitivityRun:
    """Measures configurations through ``quantizer`` and ``scorer``, resuming from ``store``."""

    def __init__(self, float_model: nn.Module, groups: Sequence[LayerGroup], quantizer: Quantizer, scorer: Scorer,
                 store: MeasurementStore, example_inputs: list[dict]) -> None:
        check_groups(float_model, groups)
        self.islandable = tensor_to_tensor_modules(float_model, example_inputs)
        self.float_model = float_model
        self.groups = list(groups)
        self.by_name = {group.name: group for group in groups}
        self.quantizer = quantizer
        self.scorer = scorer
        self.store = store

    def measure(self, key: str, float_groups: Sequence[str]) -> Measurement:
        stored = self.store.load(key)
        if stored is not None:
            logger.info("sensitivity: %s reused from %s", key, self.store.path(key))
            return stored
        if key == "float":
            modules: list[str] = []
            scores = self.scorer(self.float_model)
        else:
            modules = group_float_modules(self.float_model, [self.by_name[name] for name in float_groups],
                                          self.islandable)
            scores = self.scorer(self.quantizer(modules))
        measurement = Measurement(key, list(float_groups), modules, {k: float(v) for k, v in scores.items()})
        self.store.save(measurement)
        logger.info("sensitivity: %s -> %s", key, measurement.scores)
        return measurement

    def run(self, metrics: Sequence[str] = METRICS) -> SensitivityResult:
        names = [group.name for group in self.groups]
        plan = [("float", []), ("int8", [])]
        plan += [(f"only/{name}", [other for other in names if other != name]) for name in names]
        plan += [(f"all_but/{name}", [name]) for name in names]
        measured: dict[str, Measurement] = {}
        for key, float_groups in tqdm(plan, desc="sensitivity", unit="config"):
            measured[key] = self.measure(key, float_groups)
        return SensitivityResult(self.groups, measured["float"], measured["int8"],
                                 {n: measured[f"only/{n}"] for n in names},
                                 {n: measured[f"all_but/{n}"] for n in names}, tuple(metrics))


@dataclass
class BudgetChoice:
    max_drop: float
    float_groups: list[str]
    float_modules: list[str]
    verified: Measurement  # the chosen mix, scored
    steps: list[Measurement]  # every mix tried, in order
    within_budget: bool


def choose_float_groups(run: SensitivityRun, result: SensitivityResult, max_drop: float) -> BudgetChoice:
    """Greedily make the most sensitive groups float until every metric is within ``max_drop`` points of float32;
    each step is verified by scoring the mix (``budget/<groups>`` measurements, resumable like the others). When no
    step gets within the budget, the mix that came closest is chosen (more float groups can score worse: PTQ
    calibrates each mix anew), and ``within_budget`` says it is not within."""
    if not math.isfinite(max_drop) or max_drop < 0:
        raise InvalidArgumentError(f"--max-ap-drop must be a non-negative number of AP points, got {max_drop}")
    reference = result.float_scores.scores
    current = result.int8_scores
    steps = [current]
    chosen: list[str] = []
    for name in result.ranking():
        if drop(reference, current.scores, result.metrics) <= max_drop:
            break
        chosen.append(name)
        order = [group.name for group in result.groups if group.name in chosen]  # one key per set, any order
        # One group float is the all_but measurement of that group: already scored.
        current = result.all_but[order[0]] if len(order) == 1 else run.measure("budget/" + "+".join(order), order)
        steps.append(current)
    within = drop(reference, current.scores, result.metrics) <= max_drop
    if not within:
        current = min(steps, key=lambda step: drop(reference, step.scores, result.metrics))
    return BudgetChoice(max_drop, list(current.float_groups), list(current.float_modules), current, steps, within)


def format_sensitivity_table(result: SensitivityResult) -> str:
    """Ranked markdown table: per group, the AP with only it int8 and with all int8 but it."""
    reference = result.float_scores.scores
    metrics = result.metrics
    header = " | ".join(f"{m} only int8 | {m} all int8 but" for m in metrics)
    lines = [f"| rank | group | modules | {header} | regained (points) |",
             "|---:|---|---|" + "---:|" * (2 * len(metrics) + 1)]
    all_int8 = drop(reference, result.int8_scores.scores, metrics)
    by_name = {group.name: group for group in result.groups}
    for rank, name in enumerate(result.ranking(), start=1):
        cells = " | ".join(f"{result.only[name].scores[m]:.2f} | {result.all_but[name].scores[m]:.2f}"
                           for m in metrics)
        regained = all_int8 - drop(reference, result.all_but[name].scores, metrics)
        modules = ", ".join(f"`{module}`" for module in by_name[name].modules)
        lines.append(f"| {rank} | {name} | {modules} | {cells} | {regained:.2f} |")
    summary = ", ".join(f"{m} float32 {reference[m]:.2f} / all int8 {result.int8_scores.scores[m]:.2f}"
                        for m in metrics)
    return "\n".join(lines) + f"\n\n{summary}."


def format_budget(choice: BudgetChoice, metrics: Sequence[str]) -> str:
    scores = ", ".join(f"{m} {choice.verified.scores[m]:.2f}" for m in metrics)
    groups = ", ".join(choice.float_groups) or "none"
    verdict = "within" if choice.within_budget else "NOT within (every group tried; the closest mix is chosen)"
    islands = "\n".join(f"  - {module}" for module in choice.float_modules) or "  []"
    return (f"AP budget {choice.max_drop} points: float groups {groups}; the mix scores {scores}, {verdict} the "
            f"budget after {len(choice.steps) - 1} verified step(s). Written to the output config as:\n\n"
            f"```yaml\nQUANTIZATION:\n  FLOAT_MODULES:\n{islands}\n```")


def plot_sensitivity(result: SensitivityResult, path: str | Path, title: str) -> None:
    """Per group (ranked), each metric's loss against float32 with only that group int8 and with all int8 but it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reference = result.float_scores.scores
    ranking = result.ranking()
    fig, axes = plt.subplots(1, len(result.metrics), figsize=(5 * len(result.metrics), 0.3 * len(ranking) + 1.5),
                             squeeze=False)
    for ax, metric in zip(axes[0], result.metrics, strict=True):
        positions = range(len(ranking))
        ax.barh([p - 0.2 for p in positions], [reference[metric] - result.only[n].scores[metric] for n in ranking],
                height=0.4, label="only this group int8")
        ax.barh([p + 0.2 for p in positions], [reference[metric] - result.all_but[n].scores[metric] for n in ranking],
                height=0.4, label="all int8 but this group")
        ax.set_yticks(list(positions), ranking, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(f"{metric} loss vs float32 (points)")
        ax.grid(alpha=0.3, axis="x")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


# --- fnl-quantize --sensitivity / --max-ap-drop ------------------------------------------------------------------
SENSITIVITY_DIR = "sensitivity"


@dataclass
class SensitivityOutcome:
    """What fnl-quantize adds to its report, and the float modules the budget chose (None without a budget)."""

    notes: list[str]
    extra: dict[str, Any]
    float_modules: list[str] | None


def evaluator_scorer(cfg: Any) -> Scorer:
    """Box AP and DensePose AP on the validation split (``TEST.MAX_IMAGES`` of it), by the one evaluator every
    runtime is scored with. A missing AP (no detection at all) counts as 0 points."""
    def score(model: nn.Module) -> dict[str, float]:
        results, _ = evaluate_predictor(model, cfg, description="sensitivity")
        return {"bbox_AP": float(results["bbox"]["AP"] or 0.0),
                "densepose_AP": float(results["densepose"]["AP"] or 0.0)}

    return score


def ptq_quantizer(float_model: nn.Module, cfg: Any, engine: str) -> Quantizer:
    """The int8 model of ``float_model`` by PTQ (calibration on ``QUANTIZATION.CALIBRATION_IMAGES``) with the given
    float modules added to the configured ones."""
    def build(float_modules: list[str]) -> nn.Module:
        return quantize(float_model, with_float_modules(cfg, float_modules), "ptq", engine=engine).int8_model

    return build


def with_float_modules(cfg: Any, float_modules: Sequence[str]) -> Any:
    """A frozen copy of ``cfg`` whose QUANTIZATION.FLOAT_MODULES also holds ``float_modules``."""
    configured = list(cfg.QUANTIZATION.FLOAT_MODULES)
    mixed = cfg.clone()
    mixed.QUANTIZATION.FLOAT_MODULES = configured + [m for m in float_modules if m not in configured]
    return mixed.freeze()


def example_inputs(cfg: Any) -> list[dict]:
    """One image of the test size: enough for ``tensor_to_tensor_modules`` to see every module called."""
    size = int(cfg.INPUT.MIN_SIZE_TEST)
    image = torch.randint(0, 256, (3, size, size), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return [{"image": image, "height": size, "width": size}]


def select_groups(groups: Sequence[LayerGroup], names: Sequence[str] | None) -> list[LayerGroup]:
    """The groups named (all without names); an unknown name is refused with the list of known ones."""
    if not names:
        return list(groups)
    known = {group.name: group for group in groups}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise InvalidArgumentError(f"unknown layer group(s) {unknown}: this model has {list(known)}")
    return [known[name] for name in dict.fromkeys(names)]


def analyse(float_model: nn.Module, cfg: Any, output_dir: str | Path, engine: str,
            max_ap_drop: float | None = None, group_names: Sequence[str] | None = None) -> SensitivityOutcome:
    """The sensitivity of every layer group (or of those named in ``group_names``; PTQ, resumable under
    ``output_dir/sensitivity``: a stored measurement is reused while the config and the float weights are the
    same), its ranked table and plot, and with ``max_ap_drop`` the float groups that meet the budget."""
    output_dir = Path(output_dir)
    groups = select_groups(layer_groups(float_model), group_names)
    weights = [t.detach().cpu().contiguous().numpy().tobytes() for t in float_model.state_dict().values()]
    store = MeasurementStore(output_dir / SENSITIVITY_DIR, fingerprint(cfg.dump(), engine, *weights))
    run = SensitivityRun(float_model, groups, ptq_quantizer(float_model, cfg, engine), evaluator_scorer(cfg), store,
                         example_inputs(cfg))
    result = run.run()
    write_json_atomic(output_dir / "sensitivity.json", result.to_json())
    plot_sensitivity(result, output_dir / "sensitivity.png", f"int8 sensitivity by layer group ({engine}, PTQ)")
    images = cfg.TEST.MAX_IMAGES or "all"
    notes = [f"Sensitivity by layer group (PTQ per configuration, {images} validation images; most sensitive first; "
             "plot: `sensitivity.png`, every measurement: `sensitivity/*.json`):\n\n"
             + format_sensitivity_table(result)]
    extra: dict[str, Any] = {"sensitivity": result.to_json()}
    float_modules = None
    if max_ap_drop is not None:
        choice = choose_float_groups(run, result, max_ap_drop)
        notes.append(format_budget(choice, result.metrics))
        extra["budget"] = {"max_ap_drop": max_ap_drop, "float_groups": choice.float_groups,
                           "float_modules": choice.float_modules, "scores": choice.verified.scores,
                           "within_budget": choice.within_budget, "steps": [asdict(s) for s in choice.steps]}
        float_modules = choice.float_modules
    return SensitivityOutcome(notes, extra, float_modules)
