"""Hyper-V in user space: the partition (synthetic MSRs, hypercalls, SynIC; partition.py)
and the pieces of the Dynamic Memory (hv-balloon) device."""
