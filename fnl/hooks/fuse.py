"""Hook-preserving fusion of conv / linear + batch norm (+ activation), found automatically in any module tree.

Which modules form a group
--------------------------
Eager PyTorch has no graph, so groups are read from the module tree: within one parent, *sibling children in
registration order* ``Conv2d -> norm [-> ReLU]``, ``Linear -> BatchNorm1d [-> ReLU]``, ``Conv2d -> ReLU`` and
``Linear -> ReLU``. This assumes a parent calls those children one after the other on each other's output, in the
order it registered them. That holds for ``nn.Sequential`` (torchvision's ``Conv2dNormActivation``), for timm's
EfficientNet / MobileNet blocks (``conv_pw, bn1, conv_dw, bn2, aa, se, conv_pwl, bn3``; stem ``conv_stem, bn1``) and
for ``fnl.modeling.layers.ConvNormAct``. It does not hold everywhere: torchvision's ResNet blocks call one ``relu``
twice. Pass ``example_inputs`` to check every link by tracing one forward: a link ``a -> b`` is kept only when each
call of ``b`` takes exactly the tensor the matching call of ``a`` returned; a group is cut before its first broken
link (``conv, bn, relu`` becomes ``conv, bn`` for such a ResNet block). The trace cannot see a second consumer of
an intermediate tensor (``y = conv(x); return bn(y) + y``): compare outputs before and after fusion for that.

Module types are matched exactly (``type(m) is nn.Conv2d``), never by subclass, because a subclass may compute
something else (timm's ``Conv2dSame`` pads in ``forward``, ``CondConv2d`` takes routing weights).

Norms: ``nn.BatchNorm2d``, ``nn.SyncBatchNorm``, torchvision's ``FrozenBatchNorm2d`` (detectron2's FrozenBN) and
timm's ``BatchNormAct2d`` / ``SyncBatchNormAct`` / ``FrozenBatchNormAct2d``, whose activation lives inside the norm
(after a ``drop`` that must be ``nn.Identity``); ``nn.BatchNorm1d`` after ``Linear``.

What a group becomes
--------------------
- ``is_qat=True``, norm with running statistics (BatchNorm2d, SyncBatchNorm, BatchNormAct2d, SyncBatchNormAct):
  torch.ao's train-mode fused modules ``nni.ConvBn2d`` / ``nni.ConvBnReLU2d`` / ``nni.LinearBn1d``, which
  ``prepare_qat`` turns into their QAT versions. The norm is first rebuilt as a plain ``nn.BatchNorm2d`` sharing the
  same parameters and buffers, because those fused modules accept nothing else. A SyncBatchNorm thus trains as a
  local BatchNorm inside the QAT module (torch.ao's QAT modules have no synchronised variant).
  ``Linear + BatchNorm1d + ReLU`` keeps the ReLU as its own module: torch.ao has no ``LinearBnReLU``.
- ``is_qat=False`` (the model must be in eval mode): the running statistics are folded into a new conv / linear;
  with a ReLU the result is ``nni.ConvReLU2d`` / ``nni.LinearReLU``.
- FrozenBN (torchvision ``FrozenBatchNorm2d``, timm ``FrozenBatchNormAct2d``), either mode: folded into a new
  conv, as in eval. A frozen norm is a fixed per-channel affine map in training as well, so folding is exact;
  keeping it as a BatchNorm inside ``ConvBn2d`` would let QAT update statistics that were meant to stay frozen.
  The folded bias trains only if the conv had a trainable bias (the norm's shift was frozen).
- Activations: ``ReLU`` is fused; ``Identity`` (timm's ``apply_act=False``) disappears. Any other activation of a
  timm norm-act layer (``ReLU6``, ``Hardswish``, ``SiLU``...) stays a module of its own, placed in the norm's slot,
  so the fused module is conv+BN only: torch.ao has fused modules for ReLU only, while ``ReLU6`` / ``Hardswish``
  have quantized modules of their own (``SiLU`` has none: a float island for ``fnl.qat``). Sibling ``ReLU6`` /
  ``Hardswish`` modules are simply left where they are.

The fused module takes the first member's place in the parent; the other members' slots get ``nn.Identity``.

Hooks
-----
Forward pre-hooks of the first member and forward hooks of the last one move to the fused module (same order,
same ``with_kwargs`` / ``always_call`` flags). When a kept activation is placed in the norm's slot, the norm's
forward hooks move onto that activation, which now produces the norm's output. A hook that observes a tensor the
group swallows (a forward hook on the conv, a pre-hook on the norm or on the ReLU, any hook on a norm's ``drop``,
backward hooks) cannot be kept: the group is shortened before that tensor or not fused at all, with a warning.
Moving re-registers the hook, so a ``RemovableHandle`` taken before fusion no longer removes it.
``fuse_model`` checks the result with ``fnl.hooks.audit`` and raises if a hook went missing.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.ao.nn.intrinsic as nni
from timm.layers import BatchNormAct2d, FrozenBatchNormAct2d, SyncBatchNormAct
from torch import nn
from torch.ao.quantization.fuser_method_mappings import get_fuser_method
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights
from torchvision.ops.misc import FrozenBatchNorm2d

from fnl.hooks.audit import assert_same_hooks, audit_hooks
from fnl.hooks.registry import HOOK_KINDS, has_backward_hooks, has_forward_hooks, move_hooks

logger = logging.getLogger(__name__)

_RUNNING_STATS_NORMS_2D: frozenset[type[nn.Module]] = frozenset(
    {nn.BatchNorm2d, nn.SyncBatchNorm, BatchNormAct2d, SyncBatchNormAct}
)
_FROZEN_NORMS_2D: frozenset[type[nn.Module]] = frozenset({FrozenBatchNorm2d, FrozenBatchNormAct2d})
_NORMS_BY_HEAD: dict[type[nn.Module], frozenset[type[nn.Module]]] = {
    nn.Conv2d: _RUNNING_STATS_NORMS_2D | _FROZEN_NORMS_2D,
    nn.Linear: frozenset({nn.BatchNorm1d}),
}
# timm norm layers that run ``act(drop(norm(x)))`` inside their own forward.
_NORMS_WITH_ACTIVATION: frozenset[type[nn.Module]] = frozenset({BatchNormAct2d, SyncBatchNormAct, FrozenBatchNormAct2d})
_PLAIN_NORM_BY_HEAD: dict[type[nn.Module], type[nn.modules.batchnorm._BatchNorm]] = {
    nn.Conv2d: nn.BatchNorm2d,
    nn.Linear: nn.BatchNorm1d,
}
_HEAD_RELU_FUSED: dict[type[nn.Module], type[nn.Module]] = {nn.Conv2d: nni.ConvReLU2d, nn.Linear: nni.LinearReLU}


@dataclass(frozen=True)
class FusionGroup:
    """Sibling modules of ``parent`` fused into one, in dataflow order; ``members[0]``'s slot gets the result.

    ``norm_activation`` is the class name of the activation inside a timm norm-act layer (``None`` for plain norms);
    ``keeps_norm_activation`` says it stays a module of its own (in the norm's slot) instead of being fused.
    """

    parent: str
    members: tuple[str, ...]
    member_types: tuple[str, ...]
    norm_activation: str | None = None
    keeps_norm_activation: bool = False

    @property
    def qualified_members(self) -> tuple[str, ...]:
        return tuple(f"{self.parent}.{member}" if self.parent else member for member in self.members)

    @property
    def name(self) -> str:
        """Where the fused module lives."""
        return self.qualified_members[0]

    @property
    def has_norm(self) -> bool:
        return len(self.members) > 1 and self.member_types[1] != "ReLU"

    def renamed(self) -> dict[str, str]:
        """Where the hooks of each member (and of a norm-act's inner activation) live after fusion, for
        ``compare_hook_audits``."""
        fused_name, *absorbed = self.qualified_members
        mapping = dict.fromkeys(absorbed, fused_name)
        if self.norm_activation is not None:
            norm_name = self.qualified_members[1]
            if self.keeps_norm_activation:
                mapping[norm_name] = norm_name
                mapping[f"{norm_name}.act"] = norm_name
            else:
                mapping[f"{norm_name}.act"] = fused_name
        return mapping

    def __str__(self) -> str:
        types = list(self.member_types)
        if self.norm_activation is not None:
            types[1] += f"[{self.norm_activation}{' kept' if self.keeps_norm_activation else ''}]"
        return f"{self.name}: {' + '.join(types)} ({', '.join(self.members)})"


def find_fusion_groups(
    model: nn.Module, is_qat: bool, example_inputs: tuple[Any, ...] | None = None
) -> list[FusionGroup]:
    """All fusable groups of ``model`` (see the module docstring for the patterns and the order assumption).

    With ``example_inputs``, one forward (eval mode, no grad, modes restored afterwards) checks each group's links
    and shortens or drops the groups whose modules do not feed each other.
    """
    slot_counts = Counter(id(module) for _, module in model.named_modules(remove_duplicate=False))
    matcher = _GroupMatcher(is_qat, shared={key for key, count in slot_counts.items() if count > 1})
    groups = []
    for parent_name, parent in model.named_modules():
        if isinstance(parent, nni._FusedModule):
            continue  # already fused: its children are the fused module's internals
        children = [(name, child) for name, child in parent._modules.items() if child is not None]
        position = 0
        while position < len(children):
            group = matcher.match(parent_name, children, position)
            if group is None:
                position += 1
            else:
                groups.append(group)
                position += len(group.members)
    if example_inputs is not None:
        groups = _verify_by_tracing(model, groups, example_inputs)
    return groups


def fuse_model(
    model: nn.Module,
    is_qat: bool,
    inplace: bool = False,
    *,
    groups: Iterable[FusionGroup] | None = None,
    example_inputs: tuple[Any, ...] | None = None,
) -> nn.Module:
    """Fuses every group ``find_fusion_groups`` finds (or the given ``groups``) and returns the fused model.

    ``is_qat=True`` builds torch.ao's train-mode fused modules for ``prepare_qat``; ``is_qat=False`` folds the norms
    (the model must be in eval mode). Hooks move as the module docstring describes; the result is checked with a
    hook audit (``HookPreservationError`` if a hook was lost).
    """
    if not inplace:
        model = copy.deepcopy(model)
    if groups is None:
        groups = find_fusion_groups(model, is_qat, example_inputs)
    groups = list(groups)
    hooks_before = audit_hooks(model)
    renamed: dict[str, str] = {}
    for group in groups:
        _fuse_group(model, group, is_qat)
        renamed.update(group.renamed())
    assert_same_hooks(hooks_before, audit_hooks(model), renamed, what="fuse_model")
    logger.debug("fused %d groups (%s)", len(groups), "qat" if is_qat else "eval")
    return model


class _GroupMatcher:
    """Recognises a group starting at one child of a parent, applying the type, state and hook rules."""

    def __init__(self, is_qat: bool, shared: set[int]) -> None:
        self.is_qat = is_qat
        self.shared = shared

    def usable(self, module: nn.Module) -> bool:
        """Owned by one slot only and without backward hooks (they would see tensors fusion removes)."""
        return id(module) not in self.shared and not has_backward_hooks(module)

    def match(self, parent: str, children: list[tuple[str, nn.Module]], position: int) -> FusionGroup | None:
        head_name, head = children[position]
        norm_types = _NORMS_BY_HEAD.get(type(head))
        if norm_types is None or position + 1 >= len(children) or not self.usable(head):
            return None
        next_name, following = children[position + 1]
        after_next = children[position + 2] if position + 2 < len(children) else None
        where = f"{parent}.{head_name}" if parent else head_name
        if type(following) in norm_types:
            return self._match_norm(parent, where, (head_name, head), (next_name, following), after_next)
        if type(following) is nn.ReLU and self.usable(following):
            if has_forward_hooks(head, "forward") or has_forward_hooks(following, "forward_pre"):
                logger.warning("not fusing %s + %s: a hook observes the tensor between them", where, next_name)
                return None
            return FusionGroup(parent, (head_name, next_name), (type(head).__name__, "ReLU"))
        return None

    def _match_norm(
        self,
        parent: str,
        where: str,
        head_item: tuple[str, nn.Module],
        norm_item: tuple[str, nn.Module],
        after_norm: tuple[str, nn.Module] | None,
    ) -> FusionGroup | None:
        (head_name, head), (norm_name, norm) = head_item, norm_item
        refusal = self._norm_refusal(head, norm)
        if refusal:
            logger.warning("not fusing %s + %s: %s", where, norm_name, refusal)
            return None
        norm_activation = getattr(norm, "act", None) if type(norm) in _NORMS_WITH_ACTIVATION else None
        keeps_activation = norm_activation is not None and not (
            type(norm_activation) in (nn.ReLU, nn.Identity)
            and self.usable(norm_activation)
            and not has_forward_hooks(norm_activation, "forward_pre")
        )
        members = [head_name, norm_name]
        member_types = [type(head).__name__, type(norm).__name__]
        # Room for a sibling ReLU only when the norm's own activation (if any) is a fused-away Identity.
        ends_in_identity = norm_activation is None or (
            type(norm_activation) is nn.Identity and not keeps_activation
            and not has_forward_hooks(norm_activation, "forward")
        )
        torch_has_fused_module = not (self.is_qat and type(head) is nn.Linear)  # no LinearBnReLU1d in torch.ao
        if (
            after_norm is not None
            and type(after_norm[1]) is nn.ReLU
            and ends_in_identity
            and torch_has_fused_module
            and self.usable(after_norm[1])
            and not has_forward_hooks(norm, "forward")
            and not has_forward_hooks(after_norm[1], "forward_pre")
        ):
            members.append(after_norm[0])
            member_types.append("ReLU")
        return FusionGroup(
            parent,
            tuple(members),
            tuple(member_types),
            type(norm_activation).__name__ if norm_activation is not None else None,
            keeps_activation,
        )

    def _norm_refusal(self, head: nn.Module, norm: nn.Module) -> str:
        """Why ``head -> norm`` cannot be fused ("" when it can)."""
        out_features = head.out_channels if isinstance(head, nn.Conv2d) else head.out_features
        norm_features = norm.running_mean.shape[0] if norm.running_mean is not None else norm.num_features
        if norm_features != out_features:
            return f"{norm_features} norm features for {out_features} outputs"
        if not self.usable(norm):
            return "the norm is shared or has backward hooks"
        if has_forward_hooks(head, "forward") or has_forward_hooks(norm, "forward_pre"):
            return "a hook observes the tensor between them"
        if type(norm) in _NORMS_WITH_ACTIVATION:
            drop = norm.drop
            if type(drop) is not nn.Identity:
                return f"the norm's drop layer is {type(drop).__name__}, not Identity"
            if any(has_forward_hooks(drop, kind) for kind in HOOK_KINDS) or has_backward_hooks(drop):
                return "a hook on the norm's drop layer observes the tensor inside the norm"
        if type(norm) in _RUNNING_STATS_NORMS_2D | _NORMS_BY_HEAD[nn.Linear]:
            if not norm.track_running_stats or norm.running_mean is None or norm.running_var is None:
                return "the norm has no running statistics"
            if self.is_qat and not norm.affine:
                return "torch.ao's QAT fused modules need an affine norm"
        return ""


def _verify_by_tracing(
    model: nn.Module, groups: list[FusionGroup], example_inputs: tuple[Any, ...]
) -> list[FusionGroup]:
    members = {
        id(module): module
        for group in groups
        for module in _member_modules(model, group)
    }
    calls: dict[int, list[tuple[tuple[Any, ...], dict[str, Any], Any]]] = defaultdict(list)

    def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        calls[id(module)].append((args, kwargs, output))

    handles = [module.register_forward_hook(record, with_kwargs=True) for module in members.values()]
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training

    verified = []
    for group in groups:
        modules = _member_modules(model, group)
        linked = 1
        for producer, consumer in zip(modules, modules[1:], strict=False):
            if not _feeds(calls[id(producer)], calls[id(consumer)]):
                break
            linked += 1
        if linked < len(modules):
            logger.warning("not fusing %s into %s: tracing shows it does not always take %s's output",
                           group.qualified_members[linked], group.name, group.qualified_members[linked - 1])
        if linked >= 2:
            verified.append(replace(group, members=group.members[:linked], member_types=group.member_types[:linked]))
    return verified


def _feeds(
    producer_calls: list[tuple[tuple[Any, ...], dict[str, Any], Any]],
    consumer_calls: list[tuple[tuple[Any, ...], dict[str, Any], Any]],
) -> bool:
    """Each consumer call takes, as its only argument, the very tensor the matching producer call returned."""
    if not producer_calls or len(producer_calls) != len(consumer_calls):
        return False
    return all(
        len(consumer_args) == 1 and not consumer_kwargs and consumer_args[0] is producer_output
        for (_, _, producer_output), (consumer_args, consumer_kwargs, _) in zip(
            producer_calls, consumer_calls, strict=True
        )
    )


def _member_modules(model: nn.Module, group: FusionGroup) -> list[nn.Module]:
    parent = model.get_submodule(group.parent)
    return [parent._modules[name] for name in group.members]


def _fuse_group(model: nn.Module, group: FusionGroup, is_qat: bool) -> None:
    parent = model.get_submodule(group.parent)
    head, *rest = _member_modules(model, group)
    norm = rest[0] if group.has_norm else None
    sibling_relu = rest[-1] if rest and group.member_types[-1] == "ReLU" else None
    inner_activation = norm.act if group.norm_activation is not None else None
    kept_activation = inner_activation if group.keeps_norm_activation else None
    fused_inner_activation = None if group.keeps_norm_activation else inner_activation
    relu = sibling_relu
    if relu is None and type(fused_inner_activation) is nn.ReLU:
        relu = fused_inner_activation
    if not is_qat and norm is not None and type(norm) not in _FROZEN_NORMS_2D and norm.training:
        raise ValueError(
            f"eval fusion folds running statistics, but the norm of {group.name} is in training mode (it normalises"
            " with batch statistics): call model.eval() first, or fuse with is_qat=True"
        )

    fused = _build_fused(head, norm, relu, is_qat)
    fused.training = head.training  # torch.ao's fused Sequentials start in training mode whatever their children
    if hasattr(head, "qconfig"):
        fused.qconfig = head.qconfig
    move_hooks(head, fused, "forward_pre")
    # The modules whose forward hooks see the group's output, in the order those hooks fire today: a norm-act's
    # inner activation runs inside the norm's forward, so its own hooks come before the norm's.
    if sibling_relu is not None:
        last_modules = [sibling_relu]
    else:
        last_modules = [module for module in (fused_inner_activation, norm) if module is not None]
    # A kept activation now produces what the norm used to return, so the norm's hooks belong to it.
    last_modules_target = kept_activation if kept_activation is not None else fused
    for module in last_modules:
        move_hooks(module, last_modules_target, "forward")

    setattr(parent, group.members[0], fused)
    for position, name in enumerate(group.members[1:], start=1):
        is_norm_slot = position == 1 and norm is not None
        replacement = kept_activation if is_norm_slot and kept_activation is not None else _identity_like(head)
        setattr(parent, name, replacement)


def _build_fused(head: nn.Module, norm: nn.Module | None, relu: nn.Module | None, is_qat: bool) -> nn.Module:
    head_type = type(head)
    if norm is None:
        return _HEAD_RELU_FUSED[head_type](head, relu)
    if is_qat and type(norm) not in _FROZEN_NORMS_2D:
        plain_norm = _as_plain_batch_norm(norm, _PLAIN_NORM_BY_HEAD[head_type])
        modules = [head, plain_norm] + ([relu] if relu is not None else [])
        fuser = get_fuser_method(tuple(type(module) for module in modules))
        return fuser(True, *modules)
    folded = _fold_norm(head, norm)
    return folded if relu is None else _HEAD_RELU_FUSED[head_type](folded, relu)


def _fold_norm(head: nn.Module, norm: nn.Module) -> nn.Module:
    """A new conv / linear computing ``norm(head(x))`` with the norm's running (or frozen) statistics.

    Built anew rather than deep-copied from ``head`` (as ``torch.nn.utils.fuse_conv_bn_eval`` does), because a copy
    would carry copies of ``head``'s hooks: they would fire a second time, into copies of their owners.
    """
    scale = norm.weight if norm.weight is not None else torch.ones_like(norm.running_mean)
    shift = norm.bias if norm.bias is not None else torch.zeros_like(norm.running_mean)
    if isinstance(head, nn.Conv2d):
        folded = nn.Conv2d(
            head.in_channels, head.out_channels, head.kernel_size, head.stride, head.padding, head.dilation,
            head.groups, bias=True, padding_mode=head.padding_mode, device="meta",
        )
        weight, bias = fuse_conv_bn_weights(
            head.weight, head.bias, norm.running_mean, norm.running_var, norm.eps, scale, shift
        )
    else:
        folded = nn.Linear(head.in_features, head.out_features, bias=True, device="meta")
        weight, bias = fuse_linear_bn_weights(
            head.weight, head.bias, norm.running_mean, norm.running_var, norm.eps, scale, shift
        )
    # The meta-device placeholders are replaced, so no memory or random init is spent on them.
    folded.weight, folded.bias = weight, bias
    return folded.train(head.training)


def _as_plain_batch_norm(
    norm: nn.Module, plain_type: type[nn.modules.batchnorm._BatchNorm]
) -> nn.modules.batchnorm._BatchNorm:
    """``norm`` as an exact ``nn.BatchNorm2d`` / ``nn.BatchNorm1d`` sharing its parameters and buffers (so an
    optimizer or checkpoint that holds them stays valid). Exact types are returned as they are."""
    if type(norm) is plain_type:
        return norm
    plain = plain_type(
        norm.num_features, eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
        track_running_stats=norm.track_running_stats, device="meta",
    )
    for name in ("weight", "bias"):
        if getattr(norm, name) is not None:
            setattr(plain, name, getattr(norm, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        plain.register_buffer(name, getattr(norm, name))
    return plain.train(norm.training)


def _identity_like(module: nn.Module) -> nn.Identity:
    identity = nn.Identity()
    identity.training = module.training
    return identity
