"""Run bookkeeping: run folders and fingerprints, checkpoints, atomic writes, locks and claims, logs and
progress, user errors, speed switches, torchrun."""
