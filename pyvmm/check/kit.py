"""What a kit is: the kernel options it needs, the VM it boots, and its scenario context.

A kit boots one VM and every selected scenario of it shares that guest, in order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from pyvmm.check.context import Context
from pyvmm.check.kernel_probe import Requirement
from pyvmm.check.waits import BOOT_TIMEOUT_S


class Kit:
    name: str = ""
    title: str = ""
    requirements: list[Requirement] = []
    context_class: type[Context] = Context

    def vm_kwargs(self) -> dict[str, Any]:
        """pyvmm.VM arguments besides the kernel: memory, devices."""
        return {}

    def boot(self, kernel: Path | None, initrd: Path | None, append: str, scale: float,
             log_path: Path | None) -> Any:
        """Start the kit's VM (returns once pyvmm serves QMP; the agent is awaited by setup)."""
        import pyvmm

        vm = pyvmm.VM(kernel=kernel, initrd=initrd, append=append, boot_timeout=BOOT_TIMEOUT_S * scale,
                      log_path=log_path, **self.vm_kwargs())
        try:
            vm.start()
            vm.agent  # noqa: B018 - waits for the agent's READY (the guest is up)
        except BaseException:
            vm.close()
            raise
        return vm

    def context(self, vm: Any, scale: float, note: Callable[[str], None] | None = None) -> Context:
        return self.context_class(vm, scale, note)
