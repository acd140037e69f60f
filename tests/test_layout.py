"""The package's layout: old flat module paths still work (warned), and no code of ours uses them."""
import importlib
import pkgutil
import subprocess
import sys
import warnings

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
