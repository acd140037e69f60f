"""Train expert trajectories.

    python buffer.py --dataset flickr --image_encoder nfnet --text_encoder bert --num_experts 20 --train_epochs 10

Several GPUs: torchrun --nproc_per_node 4 buffer.py ... (each rank trains its own experts).
"""
from distill_utils.app.cli import run_script
from distill_utils.app.buffer import main

if __name__ == "__main__":
    run_script(main, outputs={"--buffer_path": "./buffer"})
