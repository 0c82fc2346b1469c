"""Port-I/O and MMIO dispatch: `Bus` routes an access to the device that owns its address."""

from bus.dispatch import Bus, BusDevice, BusOverlapError, BusRange

__all__ = ["Bus", "BusDevice", "BusOverlapError", "BusRange"]
