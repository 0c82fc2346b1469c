"""The `pyvmm check` runner, JUnit writer, registry and command line, without booting: a
fake kit stands in for the VM (it boots nothing), real scenario functions run against it."""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pyvmm import cli
from pyvmm.check import junit
from pyvmm.check.context import Context
from pyvmm.check.kit import Kit
from pyvmm.check.outcomes import CheckFailed, GuestGone, ScenarioSkipped
from pyvmm.check.registry import REGISTRY, Registry, Scenario, SelectionError, scenario
from pyvmm.check.runner import KitRun, RunOptions, format_table
from tests import stubkernel


class FakeVM:
    """Stands in for a booted pyvmm.VM: only what the runner itself touches."""

    def __init__(self) -> None:
        self.returncode = None
        self.closed = False
        self.console_text = ""

    def close(self) -> None:
        self.closed = True


class FakeContext(Context):
    def setup(self) -> None:
        self.log("setup ran")
        if self.state.get("fail_setup"):
            raise CheckFailed("no driver bound to the fake device: is CONFIG_FAKE enabled?")

    def settle(self) -> None:
        self.state["settled"] = self.state.get("settled", 0) + 1

    def prepare(self) -> None:
        self.state["prepared"] = self.state.get("prepared", 0) + 1


class FakeKit(Kit):
    name = "fake"
    title = "a kit that boots nothing"
    requirements = []
    context_class = FakeContext

    def __init__(self, fail_setup: bool = False, boot_error: Exception | None = None) -> None:
        self.vm: FakeVM | None = None
        self.boots = 0
        self.fail_setup = fail_setup
        self.boot_error = boot_error

    def boot(self, kernel, initrd, append, scale, log_path):
        self.boots += 1
        if self.boot_error is not None:
            raise self.boot_error
        self.vm = FakeVM()
        return self.vm

    def context(self, vm, scale, note=None):
        ctx = super().context(vm, scale, note)
        ctx.state["fail_setup"] = self.fail_setup
        return ctx


def sc(name: str, func) -> Scenario:
    return Scenario("fake", name, func, f"{name} expectation")


def passes(ctx) -> None:
    ctx.log("a step")


def fails(ctx) -> None:
    ctx.log("before the failure")
    raise CheckFailed("expected 4 MiB plugged within 60 s; saw 0 MiB plugged")


def skips(ctx) -> None:
    raise ScenarioSkipped("not applicable here")


def crashes(ctx) -> None:
    {}["missing"]


def run(kit: Kit, scenarios: list[Scenario]) -> tuple[KitRun, str]:
    out = io.StringIO()
    r = KitRun(kit, scenarios, RunOptions(probe=False), out)
    r.run()
    return r, out.getvalue()


def test_all_pass_one_boot_shared_and_closed() -> None:
    kit = FakeKit()
    r, out = run(kit, [sc("one", passes), sc("two", passes)])
    assert kit.boots == 1 and kit.vm.closed
    assert [(x.name, x.status) for x in r.results] == [
        ("kernel-probe", "SKIP"), ("boot", "PASS"), ("driver-check", "PASS"), ("one", "PASS"), ("two", "PASS")]
    assert not r.failed
    assert "[ 4/5] one                        running\n" in out
    assert "PASSED: 4 passed, 0 failed, 1 skipped" in out
    assert r.results[3].notes and r.results[3].notes[0].endswith("a step")


def test_failure_is_reported_settled_and_the_run_goes_on() -> None:
    kit = FakeKit()
    r, out = run(kit, [sc("bad", fails), sc("after", passes), sc("skipped", skips), sc("buggy", crashes)])
    status = {x.name: x.status for x in r.results}
    assert status == {"kernel-probe": "SKIP", "boot": "PASS", "driver-check": "PASS", "bad": "FAIL",
                      "after": "PASS", "skipped": "SKIP", "buggy": "FAIL"}
    assert r.failed
    assert "expected 4 MiB plugged within 60 s; saw 0 MiB plugged" in out
    buggy = next(x for x in r.results if x.name == "buggy")
    assert buggy.message.startswith("KeyError: 'missing' (at test_check_runner.py:")
    assert "FAILED: 3 passed, 2 failed, 2 skipped" in out


def test_settle_runs_after_each_failure_but_the_last() -> None:
    kit = FakeKit()
    settled: list[int] = []

    def record(ctx) -> None:
        settled.append(ctx.state.get("settled", 0))
    run(kit, [sc("bad", fails), sc("check", record), sc("bad2", fails)])
    assert settled == [1]


def test_prepare_runs_before_every_scenario() -> None:
    seen: list[int] = []

    def record(ctx) -> None:
        seen.append(ctx.state["prepared"])
    run(FakeKit(), [sc("a", record), sc("b", record), sc("c", record)])
    assert seen == [1, 2, 3]


def test_guest_gone_fails_the_rest_at_once() -> None:
    kit = FakeKit()

    def dies(ctx) -> None:
        ctx.vm.returncode = 1
        raise GuestGone("the VM exited (status 1) while waiting for a plug")
    r, out = run(kit, [sc("dies", dies), sc("never", passes), sc("never2", passes)])
    assert [(x.name, x.status) for x in r.results[3:]] == [("dies", "FAIL"), ("never", "FAIL"), ("never2", "FAIL")]
    assert r.results[-1].message == "not run: the VM exited (status 1)"


def test_runtime_check_failure_stops_before_the_scenarios() -> None:
    kit = FakeKit(fail_setup=True)
    r, out = run(kit, [sc("one", passes)])
    assert [(x.name, x.status) for x in r.results] == [
        ("kernel-probe", "SKIP"), ("boot", "PASS"), ("driver-check", "FAIL"), ("one", "SKIP")]
    assert "no driver bound to the fake device: is CONFIG_FAKE enabled?" in out
    assert kit.vm.closed


def test_boot_failure_is_a_verdict_not_a_traceback() -> None:
    from pyvmm.api import VMError

    kit = FakeKit(boot_error=VMError("console did not show the agent within 420 s"))
    r, out = run(kit, [sc("one", passes)])
    assert [(x.name, x.status) for x in r.results][1:] == [("boot", "FAIL"), ("one", "SKIP")]
    assert "VMError: console did not show the agent within 420 s" in out
    assert "Traceback" not in out


def test_probe_failure_boots_nothing(tmp_path: Path) -> None:
    kit = FakeKit()
    kit.requirements = [__import__("pyvmm.check.kernel_probe", fromlist=["x"]).VIRTIO_MEM]
    out = io.StringIO()
    r = KitRun(kit, [sc("one", passes)], RunOptions(kernel=stubkernel.hello_poweroff(tmp_path / "k")), out)
    r.run()
    assert kit.boots == 0 and r.failed
    assert "the kernel lacks CONFIG_VIRTIO_MEM" in out.getvalue()


def test_table_truncates_long_messages() -> None:
    from pyvmm.check.runner import Result

    table = format_table("fake", [Result("x", "FAIL", 1.0, "m" * 300)], 1.0)
    row = table.splitlines()[2]
    assert row.endswith("...") and len(row) < 160


def test_junit_carries_every_step(tmp_path: Path) -> None:
    r, _ = run(FakeKit(), [sc("bad", fails), sc("good", passes), sc("skipped", skips)])
    path = tmp_path / "out.xml"
    junit.write(path, "fake", r.results, r.seconds, {"kernel": "k"})
    root = ET.parse(path).getroot()
    suite = root.find("testsuite")
    assert suite.get("name") == "pyvmm.check.fake"
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("6", "1", "2")
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    assert cases["bad"].find("failure").get("message") == "expected 4 MiB plugged within 60 s; saw 0 MiB plugged"
    assert cases["good"].find("failure") is None and cases["good"].find("skipped") is None
    assert cases["skipped"].find("skipped").get("message") == "not applicable here"
    assert "before the failure" in cases["bad"].find("system-out").text
    assert suite.find("properties/property").get("value") == "k"


# ---------------------------------------------------------------------- registry
def test_registry_selects_in_registration_order_and_rejects_unknown_names() -> None:
    reg = Registry()
    for name in ("a", "b", "c"):
        reg.add(sc(name, passes))
    assert [s.name for s in reg.select("fake", ["c", "a"])] == ["a", "c"]
    assert [s.name for s in reg.select("fake", None)] == ["a", "b", "c"]
    with pytest.raises(SelectionError, match="unknown fake scenario x; known: a, b, c"):
        reg.select("fake", ["x"])


def test_decorator_registers_a_user_scenario_with_its_docstring() -> None:
    @scenario("virtio-mem", name="user-example-for-test")
    def my_check(ctx) -> None:
        """Plugging 64 MiB grows MemTotal
        by 64 MiB.

        Details that are not part of the expectation."""
    try:
        [found] = [s for s in REGISTRY.scenarios("virtio-mem") if s.name == "user-example-for-test"]
        assert found.expects == "Plugging 64 MiB grows MemTotal by 64 MiB."
        assert REGISTRY.scenarios("virtio-mem")[-1] is found  # after the built-in ones
    finally:
        del REGISTRY._scenarios["virtio-mem"]["user-example-for-test"]


def test_builtin_kits_have_their_scenarios() -> None:
    assert {"virtio-mem", "hv-balloon"} <= set(REGISTRY.kit_names())
    names = {s.name for s in REGISTRY.scenarios("virtio-mem")}
    assert {"plug-unplug-single-blocks", "plug-unplug-large-steps", "movable-onlining", "unplug-while-holding",
            "unplug-all", "resize-while-in-flight", "data-integrity", "reboot-mid-plug"} <= names
    assert {"balloon", "unballoon", "hot-add", "balloon-under-pressure", "status-reports"} <= {
        s.name for s in REGISTRY.scenarios("hv-balloon")}
    assert all(s.expects for s in REGISTRY.scenarios("virtio-mem") + REGISTRY.scenarios("hv-balloon"))


# ---------------------------------------------------------------------- command line
def test_cli_usage_errors_are_one_line_exit_2(capsys, tmp_path: Path) -> None:
    for argv, text in ((["check", "virtio-mem", "--scenarios", "nope"], "unknown virtio-mem scenario nope"),
                       (["check", "hv-balloon", "--kernel", str(tmp_path / "none")], "does not exist"),
                       (["check", "virtio-mem", "--timeout-scale", "0"], "--timeout-scale must be positive"),
                       (["check", "virtio-mem", "--load", str(tmp_path / "x.py")], "no such file"),
                       (["check", "virtio-mem", "--scenarios", ","], "names no scenario")):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert text in err and err.count("\n") == 1 and "Traceback" not in err, err
    with pytest.raises(SystemExit) as e:
        cli.main(["check", "s390-balloon"])
    assert e.value.code == 2


def test_cli_list_needs_no_guest(capsys) -> None:
    assert cli.main(["check", "hv-balloon", "--list", "--scenarios", "hot-add"]) == 0
    out = capsys.readouterr().out
    assert "hot-add" in out and "balloon-under-pressure" not in out


def test_cli_load_adds_a_scenario_file(capsys, tmp_path: Path) -> None:
    extra = tmp_path / "mine.py"
    extra.write_text("from pyvmm.check import scenario\n\n"
                     "@scenario('hv-balloon', name='loaded-from-file')\n"
                     "def mine(ctx):\n    '''The guest does what I expect.'''\n")
    try:
        assert cli.main(["check", "hv-balloon", "--load", str(extra), "--list"]) == 0
        out = capsys.readouterr().out
        assert "loaded-from-file" in out and "The guest does what I expect." in out
    finally:
        REGISTRY._scenarios["hv-balloon"].pop("loaded-from-file", None)


def test_cli_stub_kernel_fails_the_probe_without_booting(capsys, tmp_path: Path) -> None:
    kernel = stubkernel.hello_poweroff(tmp_path / "stub.elf")
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"")
    report = tmp_path / "junit.xml"
    assert cli.main(["check", "virtio-mem", "--kernel", str(kernel), "--initrd", str(initrd),
                     "--junit", str(report)]) == 1
    out = capsys.readouterr().out
    assert "the kernel lacks CONFIG_VIRTIO_MMIO, CONFIG_VIRTIO_MEM" in out
    assert "[ 2/" not in out  # no boot step ran
    suite = ET.parse(report).getroot().find("testsuite")
    assert suite.get("failures") == "1"
