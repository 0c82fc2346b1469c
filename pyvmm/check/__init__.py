"""`pyvmm check`: a regression-test kit for the Linux virtio-mem and hv_balloon drivers.

It probes a kernel file for the options a kit needs, boots it once, checks that the driver
bound to pyvmm's device, and runs the kit's scenarios on that guest. Adding a scenario:

    from pyvmm.check import scenario

    @scenario("virtio-mem")
    def plug_64m(ctx):
        '''Plugging 64 MiB grows MemTotal by 64 MiB.'''
        ctx.plug(64 << 20)          # requests it, waits for the device and for MemTotal
        ctx.plug(0)

Modules: kernel_probe (static check), registry (kits and scenarios), context and kit (what
a scenario is handed, what a kit boots), runner (progress and table), junit, the two kits
and their scenarios, command (the CLI subcommand).
"""

from pyvmm.check.context import Context
from pyvmm.check.outcomes import CheckFailed, ScenarioSkipped
from pyvmm.check.registry import REGISTRY, scenario

__all__ = ["Context", "CheckFailed", "ScenarioSkipped", "REGISTRY", "scenario"]
