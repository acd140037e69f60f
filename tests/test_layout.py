"""The package's layout: old flat module paths still work (warned), and no code of ours uses them."""
import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

import distill_utils
from distill_utils._moved import EXPERT_TRAINING, MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_module_path_is_the_new_module_with_a_warning(old):
    sys.modules.pop(old, None)
    parent, leaf = old.rsplit(".", 1)
    vars(sys.modules[parent]).pop(leaf, None)
    with pytest.warns(DeprecationWarning, match=MOVED[old].replace(".", r"\.")):
        module = importlib.import_module(old)
    assert module is importlib.import_module(MOVED[old])
    assert getattr(sys.modules[parent], leaf) is module  # `from distill_utils import matching` too


def test_from_the_old_experts_module_its_names_still_come_with_a_warning():
    from distill_utils.experts import training
    for name in EXPERT_TRAINING:
        vars(sys.modules["distill_utils.experts"]).pop(name, None)
        with pytest.warns(DeprecationWarning, match=f"experts.training.{name}"):
            value = getattr(importlib.import_module("distill_utils.experts"), name)
        assert value is getattr(training, name)
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        importlib.import_module("distill_utils.experts").nothing_here


def every_module():
    return sorted(info.name for info in pkgutil.walk_packages(distill_utils.__path__, "distill_utils.")
                  if info.name != "distill_utils._moved")


def test_no_module_of_ours_imports_an_old_path():
    """Every module imported with deprecation warnings as errors: an old path anywhere stops it."""
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    done = subprocess.run([sys.executable, "-W", "error:distill_utils:DeprecationWarning", "-c", code,
                           *every_module(), "buffer", "eval", "convexify"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert every_module(), "walked no modules"


ROOT = Path(__file__).resolve().parents[1]
SHARED_PARSER_HELPERS = {"cli", "context"}


def imported_modules(path: Path) -> List[str]:
    """Every module a file imports (absolute names; relative imports resolved, lazy ones included)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return found


def test_a_script_imports_no_other_script_and_the_library_no_script():
    """The pipeline's stages live in the library: a script module imports only the shared parser helpers of
    the app, and nothing outside distill_utils/app imports from it."""
    offending = []
    for path in sorted((ROOT / "distill_utils").rglob("*.py")):
        in_app = path.parent.name == "app"
        for name in imported_modules(path):
            if not name.startswith("distill_utils.app.") or name == "distill_utils.app.":
                continue
            leaf = name.split(".")[2]
            if not in_app or (leaf not in SHARED_PARSER_HELPERS and path.stem not in SHARED_PARSER_HELPERS):
                offending.append(f"{path.relative_to(ROOT)} imports {name}")
    assert offending == []


def test_the_issues_grep_finds_nothing_outside_the_shared_parser_helpers():
    pattern = r"from \.\(quickstart\|ablation\|study\|distill\|evaluate\|buffer\|convexify\) import\|from \.\.app"
    files = sorted(str(p.relative_to(ROOT)) for p in [*(ROOT / "distill_utils" / "app").glob("*.py"),
                                                      *(ROOT / "distill_utils").glob("*.py")])
    done = subprocess.run(["grep", "-l", pattern, *files], cwd=ROOT, capture_output=True, text=True)
    found = [line for line in done.stdout.split() if Path(line).stem not in SHARED_PARSER_HELPERS]
    assert done.returncode in (0, 1) and found == []
