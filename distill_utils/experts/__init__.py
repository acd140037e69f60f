"""The experts and their trajectories: training an expert, the trajectory files (the authors' twin-file
format and its metadata), shortcut trajectories and their compact encoding, the snapshot cache."""
from .._moved import old_expert_training_name as __getattr__  # noqa: F401  (the old distill_utils.experts)
