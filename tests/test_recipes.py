"""Every recipe in sh/distill.sh passes the distiller's argument validation (per-phase lists included)."""
import re
import shlex
from pathlib import Path

import pytest

from distill_utils import distill

ROOT = Path(__file__).resolve().parents[1]


def distill_recipes():
    text = (ROOT / "sh" / "distill.sh").read_text()
    common = re.search(r"COMMON=\((.*?)\)", text, re.S).group(1)
    variables = {"BUFFER_ROOT": "./buffer", "ANN_ROOT": "./data/Annotation/"}
    recipes = {}
    for key, body in re.findall(r"^\s+(\w+)\)\s+#[^\n]*\n(.*?);;", text, re.S | re.M):
        command = body.replace("\\\n", " ").replace('"${COMMON[@]}"', common)
        for name, value in variables.items():
            command = command.replace(f"${name}", value)
        argv = shlex.split(command)
        recipes[key] = argv[argv.index("distill_ptm-st.py") + 1:]
    return recipes


RECIPES = distill_recipes()


def test_every_paper_row_has_a_recipe():
    assert sorted(RECIPES) == sorted(f"{d}{n}" for d in ("flickr", "coco", "cc3m") for n in (100, 200, 500))


@pytest.mark.parametrize("key", sorted(RECIPES))
def test_recipe_validates(key):
    args = distill.parse_args(RECIPES[key])
    specs = distill.phase_specs(args)
    assert len(specs) == args.subset_num
    assert sum(s.num_queries for s in specs) in (99, 199, 499)
    assert args.image_trainable and args.sim_type == "full"
