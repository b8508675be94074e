"""fnl.hooks: forward hooks that survive fusion, ``prepare_qat`` and ``convert`` (the paper's Figure 2).

timm's ``features_only`` models with ``feature_location="expansion"`` collect the BiFPN inputs through forward
pre-hooks on ``conv_pwl``; if quantization drops those hooks, the features silently disappear.

- ``audit``: list the user hooks of a module tree, compare two lists, print them as a table.
- ``fuse``: find conv/linear + norm (+ activation) groups in any module tree and fuse them, moving the hooks.
- ``preserve``: torch.ao ``prepare`` / ``prepare_qat`` / ``convert`` wrappers that restore lost hooks and check.
"""

from fnl.hooks.audit import (
    HookAuditDiff,
    HookPreservationError,
    HookRecord,
    assert_same_hooks,
    audit_hooks,
    compare_hook_audits,
    describe_callable,
    format_hook_table,
)
from fnl.hooks.fuse import FusionGroup, find_fusion_groups, fuse_model
from fnl.hooks.preserve import (
    HookSnapshot,
    apply_preserving_hooks,
    convert_preserving_hooks,
    prepare_preserving_hooks,
    prepare_qat_preserving_hooks,
    restore_hooks,
    snapshot_hooks,
)

__all__ = [
    "FusionGroup",
    "HookAuditDiff",
    "HookPreservationError",
    "HookRecord",
    "HookSnapshot",
    "apply_preserving_hooks",
    "assert_same_hooks",
    "audit_hooks",
    "compare_hook_audits",
    "convert_preserving_hooks",
    "describe_callable",
    "find_fusion_groups",
    "format_hook_table",
    "fuse_model",
    "prepare_preserving_hooks",
    "prepare_qat_preserving_hooks",
    "restore_hooks",
    "snapshot_hooks",
]
