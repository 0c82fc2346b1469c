"""pyvmm: a Python VMM on Linux KVM. `pyvmm.VM` is the Python API; `pyvmm` the command line."""

from pyvmm.api import VM, VMError

__all__ = ["VM", "VMError"]
