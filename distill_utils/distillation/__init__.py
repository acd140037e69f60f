"""Trajectory matching: the synthetic set, the unrolled student steps and their exact gradient, segments
and their batching, start sampling, initial prototypes, the contrastive losses."""
