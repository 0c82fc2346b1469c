"""Hyper-V synthetic devices: the pieces of the Dynamic Memory (hv-balloon) device."""
