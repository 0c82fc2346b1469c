"""vCPU state over QMP and HMP: `query-cpus-fast` (QEMU's fields) and `info registers`.

For a kernel developer whose guest hangs: where is each vCPU, and in which function (with
`--system-map`). The machine holds running vCPUs only for the read.
"""

from __future__ import annotations

from typing import Any

REG_ROWS = (("rax", "rbx", "rcx", "rdx"), ("rsi", "rdi", "rbp", "rsp"), ("r8", "r9", "r10", "r11"),
            ("r12", "r13", "r14", "r15"), ("rip", "rflags"), ("cr0", "cr2", "cr3", "cr4"), ("efer",))


def format_registers(cpus: list[dict[str, Any]]) -> str:
    """QEMU-like text: a block per vCPU, upper-case names, 16 hex digits."""
    lines = []
    for cpu in cpus:
        lines.append(f"CPU#{cpu['cpu-index']} (CPL {cpu['cpl']})")
        for row in REG_ROWS:
            lines.append(" ".join(f"{'RFL' if n == 'rflags' else n.upper()}={cpu[n]:016x}" for n in row))
        if cpu.get("symbol"):
            lines.append(f"RIP is in {cpu['symbol']}")
    return "\n".join(lines) + "\n"


def register_cpu_commands(commands, hmp, machine) -> None:
    def query_cpus_fast(args: dict) -> list[dict]:
        return [{"cpu-index": c["cpu-index"], "thread-id": c["thread-id"], "target": "x86_64",
                 "qom-path": f"/machine/unattached/device[{c['cpu-index']}]",
                 "props": {"core-id": c["cpu-index"], "thread-id": 0, "socket-id": 0}}
                for c in machine.cpu_state()]

    commands.register("query-cpus-fast", query_cpus_fast, help="list the vCPUs and their host threads")
    hmp.register_info("registers", lambda: format_registers(machine.cpu_state()),
                      "show each vCPU's registers (and the symbol at RIP with --system-map)")
