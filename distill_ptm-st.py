"""Phased trajectory matching with shortcut trajectories (PTM-ST).

    python distill_ptm-st.py --dataset flickr \
        --buffer_path ./buffer/flickr/nfnet_bert/InfoNCE/convexified_0_6 ./buffer/flickr/nfnet_bert/InfoNCE/convexified_0_8 \
        --min_start_epoch 0 1 --max_start_epoch 2 3 --num_queries 200 299 --Iteration 2000 2000 --subset_num 2 \
        --sim_type full --lr_sim 10 --mini_batch_size 40 --ema_decay 0.99 --image_trainable
"""
from distill_utils.app.cli import run_script
from distill_utils.app.distill import main

if __name__ == "__main__":
    run_script(main, outputs={"--logged_dir": "./logged_files"})
