"""pyvmm's control plane: a QEMU-compatible QMP server and a small client.

The server drives a machine only through `MachineControl`; devices add
commands by registering into `QmpServer.commands` / `QmpServer.hmp`, which
they receive as objects (they never import this package).
"""

from .client import QmpClient, QmpConnectionError, QmpError
from .commands import CommandContext, CommandTable, QmpCommandError
from .hmp import HmpTable
from .machine_api import MachineControl
from .server import QmpServer

__all__ = [
    "CommandContext",
    "CommandTable",
    "HmpTable",
    "MachineControl",
    "QmpClient",
    "QmpCommandError",
    "QmpConnectionError",
    "QmpError",
    "QmpServer",
]
