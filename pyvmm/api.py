"""The Python API: `with pyvmm.VM(memory="256M") as vm:` boots a guest and drives it.

The VM runs as a `pyvmm run` child process with its QMP socket and its agent UART (ttyS1)
served in a private temporary directory, so a guest crash can never take the caller down
and the exit status is observable exactly as a user sees it. Tests, benchmarks and the
regression kit all start VMs through this class.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from pyvmm.qmp.client import QmpClient

DEFAULT_BOOT_TIMEOUT = 240.0


class VMError(Exception):
    """The VM could not start, or did not reach the expected state in time."""


class VM:
    def __init__(self, memory: str | int = "256M", cpus: int = 1, kernel: str | Path | None = None,
                 initrd: str | Path | None = None, append: str = "", cmdline: str | None = None,
                 extra_args: list[str] | None = None, agent: bool = True, qmp: bool = True,
                 boot_timeout: float = DEFAULT_BOOT_TIMEOUT, log_path: str | Path | None = None,
                 virtio_mem: list[str] | None = None, hv_balloon: str | None = None,
                 trace: str | Path | None = None) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="pyvmm-")
        self.dir = Path(self._tmp.name)
        self.qmp_path = self.dir / "qmp.sock" if qmp else None
        self.agent_path = self.dir / "agent.sock" if agent else None
        self.boot_timeout = boot_timeout
        args = [sys.executable, "-m", "pyvmm.cli", "run", "--memory", str(memory), "--cpus", str(cpus)]
        if kernel is not None:
            args += ["--kernel", str(kernel)]
        if initrd is not None:
            args += ["--initrd", str(initrd)]
        if append:
            args += ["--append", append]
        if cmdline is not None:
            args += ["--cmdline", cmdline]
        if self.qmp_path:
            args += ["--qmp", f"unix:{self.qmp_path}"]
        if self.agent_path:
            args += ["--serial1", f"unix:{self.agent_path}"]
        for opts in virtio_mem or []:
            args += ["--virtio-mem", opts]
        if hv_balloon is not None:
            args += ["--hv-balloon", hv_balloon]
        # The event trace (docs/trace-format.md); absolute, as the child may resolve paths elsewhere.
        self.trace_path = Path(trace).resolve() if trace is not None else None
        if self.trace_path is not None:
            args += ["--trace", str(self.trace_path)]
        args += extra_args or []
        self.args = args
        self.virtio_mem = {_option_id(o): VirtioMemHandle(self, _option_id(o)) for o in virtio_mem or []}
        self.hv_balloon = HvBalloonHandle(self) if hv_balloon is not None else None
        self.log_path = Path(log_path) if log_path else self.dir / "console.log"
        self._console = bytearray()
        self._console_cond = threading.Condition()
        self._proc: subprocess.Popen | None = None
        self._qmp: QmpClient | None = None
        self._agent = None
        self.started_at = 0.0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "VM":
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                          env.get("PYTHONPATH")]))
        self.started_at = time.monotonic()
        self._proc = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, env=env, start_new_session=True)
        threading.Thread(target=self._pump_console, name="vm-console", daemon=True).start()
        if self.qmp_path:
            self._wait_path(self.qmp_path, 30.0, exited_ok=True)
        return self

    def __enter__(self) -> "VM":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, timeout: float = 10.0) -> None:
        """Quit the VM if it still runs; always releases sockets and the temp dir."""
        if self._agent is not None:
            self._agent.close()
            self._agent = None
        if self._proc is not None and self._proc.poll() is None:
            try:
                self.qmp.execute("quit")
            except Exception:
                pass
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        self._tmp.cleanup()

    def _wait_path(self, path: Path, timeout: float, exited_ok: bool = False) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            if self._proc.poll() is not None:
                if exited_ok and self._proc.returncode == 0:
                    return  # a guest that already powered off cleanly
                raise VMError(f"pyvmm exited with status {self._proc.returncode} before serving {path.name}:\n"
                              + self.console_text[-2000:])
            if time.monotonic() > deadline:
                raise VMError(f"pyvmm did not create {path} within {timeout:.0f} s")
            time.sleep(0.02)

    # ------------------------------------------------------------------ console
    def _pump_console(self) -> None:
        with open(self.log_path, "ab") as log:
            while True:
                chunk = self._proc.stdout.read1(65536)
                if not chunk:
                    break
                log.write(chunk)
                log.flush()
                with self._console_cond:
                    self._console += chunk
                    self._console_cond.notify_all()
        with self._console_cond:
            self._console_cond.notify_all()

    @property
    def console_text(self) -> str:
        return self._console.decode(errors="replace")

    def console_write(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode()
        self._proc.stdin.write(data)
        self._proc.stdin.flush()

    def wait_console(self, pattern: str, timeout: float = 60.0, start: int = 0) -> re.Match:
        """Wait until the console output from byte `start` on matches the regex `pattern`."""
        rx = re.compile(pattern.encode())
        deadline = time.monotonic() + timeout
        with self._console_cond:
            while True:
                m = rx.search(self._console, start)
                if m:
                    return m
                if self._proc.poll() is not None and not self._console_cond.wait(0.2):
                    raise VMError(f"pyvmm exited ({self._proc.returncode}) before the console showed {pattern!r}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise VMError(f"console did not show {pattern!r} within {timeout:.0f} s; last output:\n"
                                  + self.console_text[-1500:])
                self._console_cond.wait(min(left, 1.0))

    @property
    def console_offset(self) -> int:
        return len(self._console)

    # ------------------------------------------------------------------ control
    @property
    def qmp(self) -> QmpClient:
        if self._qmp is None:
            if self.qmp_path is None:
                raise VMError("this VM was started without QMP")
            self._qmp = QmpClient(str(self.qmp_path))
        return self._qmp

    @property
    def agent(self):
        """The guest agent (waits for its READY line on first use)."""
        if self._agent is None:
            from pyvmm.agent import Agent

            if self.agent_path is None:
                raise VMError("this VM was started without the agent UART")
            self._wait_path(self.agent_path, 30.0)
            from pyvmm.agent import AgentError

            agent = Agent(self.agent_path)
            try:
                agent.wait_ready(max(self.boot_timeout - (time.monotonic() - self.started_at), 10.0))
            except AgentError as e:
                agent.close()
                raise VMError(f"{e}\nconsole tail:\n{self.console_text[-2000:]}") from None
            self._agent = agent
        return self._agent

    def wait_for(self, predicate: Callable[[], object], timeout: float, interval: float = 0.5,
                 what: str = "condition") -> object:
        """Poll `predicate` until it returns a truthy value; raise VMError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if self._proc.poll() is not None:
                raise VMError(f"pyvmm exited ({self._proc.returncode}) while waiting for {what}")
            if time.monotonic() > deadline:
                raise VMError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(interval)

    def powerdown(self, timeout: float = 120.0) -> int:
        """ACPI power button, then wait for pyvmm to exit; returns its exit status."""
        self.qmp.execute("system_powerdown")
        return self.wait_exit(timeout)

    def wait_exit(self, timeout: float = 120.0) -> int:
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise VMError(f"pyvmm did not exit within {timeout:.0f} s") from None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc else None

    @property
    def pid(self) -> int:
        return self._proc.pid


def _option_id(opts: str) -> str:
    for item in opts.split(","):
        key, _, value = item.partition("=")
        if key == "id":
            return value
    raise VMError(f"virtio-mem options {opts!r} have no id=")


class VirtioMemHandle:
    """`vm.virtio_mem["vm0"]`: ask the guest for a size and wait until it got there."""

    def __init__(self, vm: VM, id: str) -> None:
        self.vm = vm
        self.id = id

    def request(self, size: int) -> None:
        self.vm.qmp.execute("qom-set", {"path": f"/machine/peripheral/{self.id}",
                                        "property": "requested-size", "value": int(size)})

    def info(self) -> dict:
        for dev in self.vm.qmp.execute("query-memory-devices"):
            if dev["type"] == "virtio-mem" and dev["data"]["id"] == self.id:
                return dev["data"]
        raise VMError(f"no virtio-mem device {self.id!r}")

    @property
    def plugged(self) -> int:
        return self.info()["size"]

    def wait_plugged(self, size: int, timeout: float) -> None:
        """Wait until the device reports `size` bytes plugged (the guest driver acted)."""
        self.vm.wait_for(lambda: self.plugged == size, timeout, interval=0.5,
                         what=f"virtio-mem {self.id} to reach {size} bytes plugged")


class HvBalloonHandle:
    """`vm.hv_balloon`: set the guest's target size and wait until the guest got there."""

    def __init__(self, vm: VM) -> None:
        self.vm = vm

    def set_target(self, size: int) -> None:
        """QMP `balloon`: below the boot size the guest balloons, above it memory is hot-added."""
        self.vm.qmp.execute("balloon", {"value": int(size)})

    @property
    def actual(self) -> int:
        return self.vm.qmp.execute("query-balloon")["actual"]

    def status_report(self) -> dict:
        return self.vm.qmp.execute("query-hv-balloon-status-report")

    def wait_actual(self, size: int, timeout: float) -> None:
        """Wait until the device reports `size` bytes (boot + hot-added - ballooned)."""
        self.vm.wait_for(lambda: self.actual == size, timeout, interval=0.5,
                         what=f"hv-balloon to reach {size} bytes")
