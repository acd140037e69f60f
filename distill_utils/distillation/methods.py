"""The methods of the field as presets of ``distill_ptm-st.py``'s flags (``--method NAME``).

(:func:`distill_utils.app.cli.apply_preset` sets a preset as the parser's defaults.)

A preset only changes defaults: a flag given on the command line wins. Every method runs through the
same matcher, student evaluation and checkpoints; they differ only in the flags below.

* ``mttvl`` (Wu et al., MTT-VL): one phase on normal trajectories; the similarity is the identity
  and is not learned; the step sizes are learned (as in every method here).
* ``lors`` (Xu et al., LoRS): one phase on normal trajectories; the similarity is learned
  (``--sim_type full`` or ``lowrank``).
* ``ptmst`` (PTM-ST, the default): phases, each on its own shortcut trajectories.
* ``amd`` (Qi et al., ICLR 2026): LoRS plus asynchronous starts, each side's range derived from its
  per-epoch parameter change (``--async_starts dynamic``), and prototype initialisation
  (``--pair_init prototype``).
* ``repblend`` (Zhang et al., NeurIPS 2025): LoRS on a frozen image encoder, so both sides are
  projection heads and both heads' trajectories are matched, with one normalisation for both
  (``--no-image_trainable``: ``--image_trainable false``, ``--match_norm joint``), plus
  representation blending in the student steps (``--blend``).

The one-phase presets default to one phase as large as ``ptmst``'s two together (500 pairs,
5000 iterations), so the defaults compare at equal budget and equal iterations.
"""
from __future__ import annotations

import logging
from typing import Dict, Mapping, Optional, Sequence

log = logging.getLogger("ptmst.distill")

ONE_PHASE = {"subset_num": 1, "num_queries": [500], "Iteration": [5000], "sim_rank": None}
METHODS: Dict[str, dict] = {
    "ptmst": {"subset_num": 2, "num_queries": [200, 300], "Iteration": [2000, 3000], "learn_sim": True,
              "async_starts": "off", "pair_init": "random", "blend": 0.0, "match_norm": "per_side"},
    "mttvl": {**ONE_PHASE, "learn_sim": False, "sim_type": "full", "async_starts": "off", "pair_init": "random",
              "blend": 0.0, "match_norm": "per_side"},
    "lors": {**ONE_PHASE, "learn_sim": True, "async_starts": "off", "pair_init": "random", "blend": 0.0,
             "match_norm": "per_side"},
    "amd": {**ONE_PHASE, "learn_sim": True, "async_starts": "dynamic", "pair_init": "prototype", "blend": 0.0,
            "match_norm": "per_side"},
    "repblend": {**ONE_PHASE, "learn_sim": True, "image_trainable": False, "async_starts": "off",
                 "pair_init": "random", "blend": 0.5, "match_norm": "joint"},
}
# which trajectories each method is defined on
TRAJECTORIES = {"ptmst": "shortcut", "mttvl": "normal", "lors": "normal", "amd": "normal", "repblend": "normal"}


def check_method_fits(method: str, values: Mapping[str, object], trajectory_kinds: Sequence[Optional[str]],
                      given: Sequence[str]) -> None:
    """Warn where explicit flags (``given``, with the run's ``values``) or the trajectory folders make a
    run differ from the method it names."""
    overridden = sorted(k for k in METHODS[method] if k in given and values[k] != METHODS[method][k]
                        and k not in ONE_PHASE)
    if overridden:
        log.warning("--method %s with %s changed by the command line: the run is a variant of %s, not %s itself",
                    method, ", ".join(f"--{k}" for k in overridden), method, method)
    want = TRAJECTORIES[method]
    for k, kind in enumerate(trajectory_kinds):
        if kind is not None and kind != want:
            log.warning("--method %s is defined on %s trajectories but phase %d's --buffer_path holds %s ones",
                        method, want, k, kind)
