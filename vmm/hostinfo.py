"""Facts about the host KVM that change what the guest kernel needs on its command line.

The only case today: on a PVM host (the `kvm_pvm` module), a guest's user-space SYSCALL
arrives in the guest kernel as a page fault. pyvmm's default guest kernel carries a patch
that turns exactly that fault into the system call, enabled only by the boot parameter
`pvm_user_syscall`, so the kernel behaves like upstream everywhere else.
"""

from __future__ import annotations

from pathlib import Path

PVM_MODULE = Path("/sys/module/kvm_pvm")


def host_is_pvm() -> bool:
    return PVM_MODULE.exists()


def host_kernel_params() -> list[str]:
    """Guest kernel parameters the host KVM requires."""
    return ["pvm_user_syscall"] if host_is_pvm() else []
