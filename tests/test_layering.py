"""fnl's packages import one way, as fnl/__init__.py states: a module imports its own package and the layers below
it, never a layer above or beside it. Every import of every module is read with ``ast``, those inside functions
included."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import fnl

PACKAGE_DIR = Path(fnl.__file__).parent
# Top to bottom; packages in one tuple share a layer and do not import each other.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("cli",), ("export",), ("qat",), ("engine",), ("modeling", "evaluation"), ("data",), ("config", "hooks"),
    ("utils",),
)
LEVEL = {package: level for level, packages in enumerate(LAYERS) for package in packages}


@dataclass(frozen=True)
class FnlImport:
    module: str  # the importing module, e.g. fnl.qat.report
    target: str  # the imported module or package, e.g. fnl.engine.checkpoint
    line: int
    in_function: bool
    commented: bool  # a comment on the import's line or the line above it gives the reason

    def where(self) -> str:
        return f"{self.module} line {self.line} imports {self.target}"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def fnl_imports(path: Path) -> list[FnlImport]:
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    functions = [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    inside = {id(child) for function in functions for child in ast.walk(function)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the importing package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            targets = [base]
        else:
            continue
        commented = any("#" in lines[i] for i in range(max(node.lineno - 2, 0), node.end_lineno))
        found += [FnlImport(module, target, node.lineno, id(node) in inside, commented)
                  for target in targets if target == "fnl" or target.startswith("fnl.")]
    return found


def all_imports() -> list[FnlImport]:
    return [found for path in sorted(PACKAGE_DIR.rglob("*.py")) for found in fnl_imports(path)]


def layer_of(module: str) -> str | None:
    """The top-level package of fnl that ``module`` belongs to; None for ``fnl`` itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_package_has_a_layer() -> None:
    packages = {path.name for path in PACKAGE_DIR.iterdir() if (path / "__init__.py").is_file()}
    assert packages == set(LEVEL), "add the package to LAYERS here and to the line in fnl/__init__.py"


def test_imports_go_down_only() -> None:
    wrong = []
    for found in all_imports():
        source, target = layer_of(found.module), layer_of(found.target)
        if target is None:
            continue  # fnl itself holds __version__ and imports nothing of fnl (checked just below)
        if source is None:
            wrong.append(f"{found.where()}: fnl/__init__.py imports nothing of fnl, so that `import fnl` is light")
        elif source != target and LEVEL[target] <= LEVEL[source]:
            direction = "beside" if LEVEL[target] == LEVEL[source] else "above"
            wrong.append(f"{found.where()}: {target} is {direction} {source}")
    assert not wrong, "imports against fnl's layering (fnl/__init__.py):\n" + "\n".join(wrong)


def test_imports_inside_functions_say_why() -> None:
    """Inside a function only where importing at module level would cost every user of the module (an optional
    extra, torch for a command's --help), with the reason in a comment. fnl.cli is that case as a whole: a command
    imports the pipeline when it runs, so that --help and argument errors answer without loading torch (its
    package docstring says so)."""
    silent = [found.where() for found in all_imports()
              if found.in_function and not found.commented and layer_of(found.module) != "cli"]
    assert not silent, "move these to module level, or comment why not:\n" + "\n".join(silent)


def test_the_layering_line_is_in_fnl_docstring() -> None:
    line = " -> ".join(packages[0] if len(packages) == 1 else f"({', '.join(packages)})" for packages in LAYERS)
    assert line in " ".join((fnl.__doc__ or "").split())
