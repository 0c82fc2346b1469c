"""The pytest plugin (pyvmm/pytest_plugin.py) driven through pytester: a kernel matrix from
two --pyvmm-kernel values, the VM fixture's module and session scopes, pytest-xdist with
two workers, and the kit's scenarios as tests.

The kernels are tests/stubkernel.py stubs that print their name and halt: real pyvmm VMs
that boot in well under a second, so every VM here is real. Skipped only without /dev/kvm.
"""

from __future__ import annotations

import json
import os
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from tests import stubkernel

pytest_plugins = ["pytester"]

KVM = "/dev/kvm"
pytestmark = pytest.mark.skipif(not os.access(KVM, os.R_OK | os.W_OK),
                                reason=f"{KVM} is missing or not readable and writable")
REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT = 300  # pytest in a subprocess booting several stubs, on a shared 2-core host


def plugin_args() -> list[str]:
    """Load the plugin by its module name unless the installed package already registers
    it through the pytest11 entry point (registering it twice is an error)."""
    installed = any(ep.name == "pyvmm" for ep in entry_points(group="pytest11"))
    return [] if installed else ["-p", "pyvmm.pytest_plugin"]


@pytest.fixture
def kernels(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name in ("stub-a.elf", "stub-b.elf"):
        text = f"hello from {name}\n".encode()
        out[name] = stubkernel.write_stub(tmp_path / name, stubkernel.print_code(text) + stubkernel.HLT_LOOP)
    return out


@pytest.fixture
def env(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    # The inner pytest imports this worktree's pyvmm and tests packages.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return pytester


VM_TESTS = """
import json, os, pytest

pytestmark = pytest.mark.pyvmm(memory="64M", wait_agent=False)
RECORDS = {records!r}


def record(vm, kernel, test):
    name = f"{{os.getpid()}}-{{__name__}}-{{test}}-{{kernel.id}}.json"
    with open(os.path.join(RECORDS, name), "w") as f:
        json.dump({{"vm": vm.pid, "kernel": kernel.id, "module": __name__, "test": test,
                   "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"), "vm_dir": str(vm.dir)}}, f)


def test_one(pyvmm_vm, pyvmm_kernel):
    pyvmm_vm.wait_console("hello from " + pyvmm_kernel.id, timeout=60)
    record(pyvmm_vm, pyvmm_kernel, "one")


def test_two(pyvmm_vm, pyvmm_kernel):
    assert pyvmm_vm.returncode is None
    assert "hello from " + pyvmm_kernel.id in pyvmm_vm.console_text
    record(pyvmm_vm, pyvmm_kernel, "two")


def test_without_a_vm():
    pass
"""


def write_modules(pytester: pytest.Pytester, records: Path, names=("test_mod1", "test_mod2")) -> None:
    for name in names:
        pytester.makepyfile(**{name: VM_TESTS.format(records=str(records))})


def read_records(records: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(records.glob("*.json"))]


def kernel_args(kernels: dict[str, Path]) -> list[str]:
    return [arg for path in kernels.values() for arg in ("--pyvmm-kernel", str(path))]


def assert_vms_gone(records: list[dict]) -> None:
    for pid in {r["vm"] for r in records}:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_kernel_matrix_and_module_scope(env: pytest.Pytester, kernels: dict[str, Path], tmp_path: Path) -> None:
    records = tmp_path / "records"
    records.mkdir()
    write_modules(env, records)
    result = env.runpytest_subprocess(*plugin_args(), "-v", *kernel_args(kernels), timeout=RUN_TIMEOUT)
    result.assert_outcomes(passed=10)  # 2 modules x (2 tests x 2 kernels + 1 without a VM)
    result.stdout.fnmatch_lines(["*test_mod1.py::test_one?stub-a.elf? PASSED*",
                                 "*test_mod1.py::test_one?stub-b.elf? PASSED*"])
    recs = read_records(records)
    assert len(recs) == 8
    vm_of = {}
    for r in recs:
        vm_of.setdefault((r["module"], r["kernel"]), set()).add(r["vm"])
    # one VM per module and kernel, shared by both tests
    assert all(len(pids) == 1 for pids in vm_of.values()), vm_of
    assert len({pid for pids in vm_of.values() for pid in pids}) == 4
    assert len({r["vm_dir"] for r in recs}) == 4
    assert_vms_gone(recs)


def test_session_scope_shares_one_vm_per_kernel(env: pytest.Pytester, kernels: dict[str, Path],
                                               tmp_path: Path) -> None:
    records = tmp_path / "records"
    records.mkdir()
    write_modules(env, records)
    # A session-scoped VM belongs to no module: it is configured by overriding the options fixture.
    env.makeconftest("""
        import pytest

        @pytest.fixture(scope="session")
        def pyvmm_vm_options():
            return {"memory": "64M", "wait_agent": False}
    """)
    result = env.runpytest_subprocess(*plugin_args(), "-o", "pyvmm_vm_scope=session", *kernel_args(kernels),
                                      timeout=RUN_TIMEOUT)
    result.assert_outcomes(passed=10)
    recs = read_records(records)
    by_kernel = {}
    for r in recs:
        by_kernel.setdefault(r["kernel"], set()).add(r["vm"])
    assert sorted(by_kernel) == ["stub-a.elf", "stub-b.elf"]
    assert all(len(pids) == 1 for pids in by_kernel.values()), by_kernel
    assert_vms_gone(recs)


def test_xdist_workers_boot_their_own_vms(env: pytest.Pytester, kernels: dict[str, Path], tmp_path: Path) -> None:
    records = tmp_path / "records"
    records.mkdir()
    write_modules(env, records)
    result = env.runpytest_subprocess(*plugin_args(), "-p", "xdist", "-n", "2", "--dist", "loadscope",
                                      *kernel_args(kernels), timeout=RUN_TIMEOUT)
    result.assert_outcomes(passed=10)
    recs = read_records(records)
    assert {r["worker"] for r in recs} == {"gw0", "gw1"}
    vm_of = {}
    for r in recs:
        vm_of.setdefault((r["worker"], r["module"], r["kernel"]), set()).add(r["vm"])
    assert all(len(pids) == 1 for pids in vm_of.values()), vm_of
    # no VM is shared between workers, and each has its own directory
    workers_of_vm = {}
    for r in recs:
        workers_of_vm.setdefault(r["vm"], set()).add(r["worker"])
    assert all(len(w) == 1 for w in workers_of_vm.values())
    assert len({r["vm_dir"] for r in recs}) == len(workers_of_vm)
    assert_vms_gone(recs)


def test_default_matrix_is_the_default_guest(env: pytest.Pytester) -> None:
    env.makepyfile(test_ids="""
        def test_kernel(pyvmm_kernel):
            assert pyvmm_kernel.path is None and pyvmm_kernel.id == "default-guest"
    """)
    result = env.runpytest_subprocess(*plugin_args(), "-v", timeout=RUN_TIMEOUT)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*test_kernel?default-guest? PASSED*"])


def test_bad_options_are_usage_errors(env: pytest.Pytester, tmp_path: Path) -> None:
    env.makepyfile(test_x="def test_x(): pass\n")
    result = env.runpytest_subprocess(*plugin_args(), "--pyvmm-kernel", str(tmp_path / "nope"), timeout=RUN_TIMEOUT)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--pyvmm-kernel*nope: no such file*"])


KIT_TESTS = """
import pytest
import pyvmm
from pyvmm.check import CheckFailed, ScenarioSkipped, scenario
from pyvmm.check.context import Context
from pyvmm.check.kit import Kit
from pyvmm.check.registry import REGISTRY
from pyvmm.pytest_plugin import kit_tests


class StubContext(Context):
    def setup(self):
        self.vm.wait_console("hello from", timeout=60)
        self.state["setups"] = self.state.get("setups", 0) + 1


class StubKit(Kit):
    name = "stub-kit"
    title = "stub kernels"
    context_class = StubContext

    def boot(self, kernel, initrd, append, scale, log_path):
        return pyvmm.VM(kernel=kernel, memory="64M", log_path=log_path).start()


REGISTRY.add_kit(StubKit())
SEEN = []


@scenario("stub-kit")
def first(ctx):
    '''The stub has printed its greeting.'''
    SEEN.append(ctx.vm.pid)
    assert "hello from" in ctx.vm.console_text


@scenario("stub-kit")
def second(ctx):
    '''Runs on the same guest as the first.'''
    assert SEEN and SEEN[-1] == ctx.vm.pid and ctx.state["setups"] == 1


@scenario("stub-kit")
def broken(ctx):
    '''Fails with a message.'''
    raise CheckFailed("expected 4 MiB plugged within 60 s; saw 0 MiB plugged")


@scenario("stub-kit")
def not_here(ctx):
    '''Does not apply.'''
    raise ScenarioSkipped("no such device here")


test_stub_kit = kit_tests("stub-kit")
test_real_kit_on_a_stub = kit_tests("virtio-mem", ["unplug-all"])
"""


def test_kit_scenarios_run_as_tests(env: pytest.Pytester, kernels: dict[str, Path]) -> None:
    env.makepyfile(test_kit=KIT_TESTS)
    result = env.runpytest_subprocess(*plugin_args(), "-v", "-rA", "--pyvmm-kernel", str(kernels["stub-a.elf"]),
                                      timeout=RUN_TIMEOUT)
    result.assert_outcomes(passed=2, failed=1, skipped=1, errors=1)
    result.stdout.fnmatch_lines([
        "*test_stub_kit?stub-a.elf-stub-kit-first? PASSED*",
        "*test_stub_kit?stub-a.elf-stub-kit-second? PASSED*",
        "*test_stub_kit?stub-a.elf-stub-kit-broken? FAILED*",
        "*test_stub_kit?stub-a.elf-stub-kit-not-here? SKIPPED*",
    ])
    result.stdout.fnmatch_lines(["*expected 4 MiB plugged within 60 s; saw 0 MiB plugged*"])
    # the real virtio-mem kit refuses the stub at its static probe, before booting
    result.stdout.fnmatch_lines(["*the kernel lacks CONFIG_VIRTIO_MMIO, CONFIG_VIRTIO_MEM*"])


def test_waiter_reports_what_it_expected_and_saw(tmp_path: Path) -> None:
    import pyvmm
    from pyvmm.check.outcomes import CheckFailed, GuestGone
    from pyvmm.pytest_plugin import Waiter

    kernel = stubkernel.write_stub(tmp_path / "halt.elf", stubkernel.print_code(b"up\n") + stubkernel.HLT_LOOP)
    with pyvmm.VM(kernel=kernel, memory="64M", virtio_mem=["id=vm0,size=128M"]) as vm:
        wait = Waiter(vm)
        # a halted stub has no virtio-mem driver: nothing is ever plugged
        with pytest.raises(CheckFailed, match=r"^expected virtio-mem vm0 at 4 MiB plugged within 1 s; "
                                              r"saw 0 MiB plugged$"):
            wait.virtio_mem_plugged("vm0", 4 << 20, timeout=1.0)
        assert wait.until(lambda: "up" in vm.console_text and 42, 30, "the stub's output") == 42
        vm.qmp.execute("quit")
        with pytest.raises(GuestGone, match="the VM exited"):
            wait.until(lambda: False, 30, "something that never comes")
