"""The package's import structure: the training loop imports nothing of the interactive page, at any depth or level.

The loop (caption_train.train) and the page (caption_train.iterative) know each other only through the hook
protocol (caption_train.hooks); only the command layer (caption_train.cli) wires the page to the loop. Checked
twice: statically (every import statement, module-level or inside a function, of every module train.py can reach)
and live (what `import caption_train.train` loads in a fresh interpreter).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "caption_train"
PAGE = "caption_train.iterative"


def module_file(name: str) -> Path | None:
    """The source file of a caption_train module (a package's __init__.py), or None when there is none."""
    parts = name.split(".")
    if parts[0] != "caption_train":
        return None
    base = REPO.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def imported_modules(name: str) -> set[str]:
    """Every caption_train module that the source of `name` imports, at any level: module-level, inside functions,
    under TYPE_CHECKING, relative, and `importlib.import_module("...")` with a literal name. Importing a module
    also runs its parent packages' __init__, so those count too."""
    path = module_file(name)
    assert path is not None, name
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package, up level - 1
                package = _package_of(name, path).split(".")
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]  # `from pkg import submodule`
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            targets = [node.args[0].value]
        for target in targets:
            parts = target.split(".")
            for end in range(1, len(parts) + 1):  # the parents' __init__ run first
                if module_file(prefix := ".".join(parts[:end])) is not None:
                    found.add(prefix)
    found.discard(name)
    return found


def reachable(start: str) -> dict[str, list[str]]:
    """Every caption_train module reachable from `start` through imports at any level -> the import chain to it."""
    chains = {start: [start]}
    todo = [start]
    while todo:
        current = todo.pop()
        for module in sorted(imported_modules(current)):
            if module not in chains:
                chains[module] = chains[current] + [module]
                todo.append(module)
    return chains


def in_page(module: str) -> bool:
    return module == PAGE or module.startswith(PAGE + ".")


def test_the_scanner_sees_function_level_and_package_imports():
    """Else the checks below could pass by not seeing: train.py imports evaluate only inside functions, and
    `from caption_train.data.scan import ...` runs caption_train.data's __init__ too."""
    direct = imported_modules("caption_train.train")
    assert {"caption_train.evaluate", "caption_train.metrics", "caption_train.hooks", "caption_train.data", "caption_train.data.scan"} <= direct
    assert "caption_train.iterative" in imported_modules("caption_train.cli")  # cli.make_hooks imports it in a function


def test_nothing_the_training_loop_can_import_is_part_of_the_page():
    chains = reachable("caption_train.train")
    assert "caption_train.hooks" in chains and "caption_train.config" in chains
    leaks = [" -> ".join(chain) for module, chain in chains.items() if in_page(module)]
    assert not leaks, f"the training loop reaches the interactive page: {leaks}"


def test_the_hook_protocol_depends_on_neither_side():
    chains = reachable("caption_train.hooks")
    assert not [module for module in chains if in_page(module) or module == "caption_train.train"], chains


def test_the_page_does_not_import_the_training_loop():
    """The other half of the old circle: the page's hooks use the protocol, never train.py."""
    page_modules = [f"{PAGE}.{path.stem}" for path in (PACKAGE / "iterative").glob("*.py") if path.stem != "__init__"] + [PAGE]
    for module in page_modules:
        chains = reachable(module)
        assert "caption_train.train" not in chains, " -> ".join(chains["caption_train.train"])
    assert "caption_train.hooks" in reachable(f"{PAGE}.hooks")


def test_importing_the_training_loop_loads_nothing_of_the_page():
    """Live, in a fresh interpreter (this one has the page loaded by other tests)."""
    code = "import json, sys, caption_train.train; print(json.dumps(sorted(m for m in sys.modules if m.startswith('caption_train'))))"
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout)
    assert "caption_train.train" in loaded and "caption_train.hooks" in loaded
    assert [module for module in loaded if in_page(module)] == []
