"""pytest plugin: booted pyvmm guests as fixtures, over a matrix of kernels.

Registered through the `pytest11` entry point, so installing pyvmm enables it. Options:

    --pyvmm-kernel PATH      a kernel to test (repeatable: every test that uses a VM runs once
                             per kernel, its id the kernel's file name); default: the default guest
    --pyvmm-initrd PATH      initramfs for those kernels (default: the default guest's, with the agent)
    --pyvmm-append ARGS      added to every guest's kernel command line
    --pyvmm-timeout-scale F  stretch every boot and wait timeout on a slow host

Fixtures:

    pyvmm_vm           a booted pyvmm.VM, one per module and kernel (ini `pyvmm_vm_scope =
                       session` for one per session); configure it with a module-level
                       `pytestmark = pytest.mark.pyvmm(memory="512M", virtio_mem=["id=vm0,size=1G"])`
                       or by overriding the `pyvmm_vm_options` fixture
    pyvmm_kernel       the KernelParam of the current matrix entry (.path, .id)
    pyvmm_wait         helpers that wait for a device's size or state, with clear timeouts

and `kit_tests("virtio-mem")`, which turns the `pyvmm check` scenarios into one test each.
With pytest-xdist every worker boots its own guests in its own temporary directories.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from pyvmm.check import waits
from pyvmm.check.outcomes import CheckFailed, ScenarioSkipped

KERNEL_FIXTURE = "pyvmm_kernel"
DEFAULT_KERNEL_ID = "default-guest"
MARKER = "pyvmm"
VM_SCOPE_INI = "pyvmm_vm_scope"
VM_SCOPES = ("module", "session")


@dataclass(frozen=True)
class KernelParam:
    """One entry of the kernel matrix: `path` None means the default guest."""
    path: Path | None
    id: str


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pyvmm", "pyvmm guests")
    group.addoption("--pyvmm-kernel", action="append", default=[], metavar="PATH",
                    help="kernel to boot for tests using pyvmm_vm (repeatable: one run per kernel)")
    group.addoption("--pyvmm-initrd", metavar="PATH",
                    help="initramfs for --pyvmm-kernel (default: the default guest's, with the agent)")
    group.addoption("--pyvmm-append", default="", metavar="ARGS", help="added to each guest's kernel command line")
    group.addoption("--pyvmm-timeout-scale", type=float, default=1.0, metavar="F",
                    help="multiply boot and wait timeouts by F")
    parser.addini(VM_SCOPE_INI, "scope of the pyvmm_vm fixture: module (default) or session", default="module")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARKER}(**options): pyvmm.VM options for the pyvmm_vm fixture "
                                       "(memory, cpus, virtio_mem, hv_balloon, append, extra_args; "
                                       "wait_agent=False for a kernel without the agent)")
    scope = config.getini(VM_SCOPE_INI)
    if scope not in VM_SCOPES:
        raise pytest.UsageError(f"{VM_SCOPE_INI} must be one of {', '.join(VM_SCOPES)}, not {scope!r}")
    for path in config.getoption("--pyvmm-kernel"):
        if not Path(path).is_file():
            raise pytest.UsageError(f"--pyvmm-kernel {path}: no such file")
    initrd = config.getoption("--pyvmm-initrd")
    if initrd and not Path(initrd).is_file():
        raise pytest.UsageError(f"--pyvmm-initrd {initrd}: no such file")
    if config.getoption("--pyvmm-timeout-scale") <= 0:
        raise pytest.UsageError("--pyvmm-timeout-scale must be positive")


def kernel_params(paths: list[str]) -> list[KernelParam]:
    """The matrix from --pyvmm-kernel values; ids are file names, made unique with the
    parent directory (then an index) when two kernels share a name."""
    if not paths:
        return [KernelParam(None, DEFAULT_KERNEL_ID)]
    resolved = [Path(p) for p in paths]
    names = [p.name for p in resolved]
    ids = []
    for p in resolved:
        ident = p.name if names.count(p.name) == 1 else f"{p.parent.name}-{p.name}"
        while ident in ids:
            ident = f"{ident}-{len(ids)}"
        ids.append(ident)
    return [KernelParam(p, i) for p, i in zip(resolved, ids)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if KERNEL_FIXTURE in metafunc.fixturenames:
        params = kernel_params(metafunc.config.getoption("--pyvmm-kernel"))
        metafunc.parametrize(KERNEL_FIXTURE, params, ids=[p.id for p in params], indirect=True, scope="session")


def _vm_scope(fixture_name: str, config: pytest.Config) -> str:
    return config.getini(VM_SCOPE_INI)


@pytest.fixture(scope="session")
def pyvmm_kernel(request: pytest.FixtureRequest) -> KernelParam:
    """The kernel of the current matrix entry (parametrized by pytest_generate_tests)."""
    return request.param


@pytest.fixture(scope="session")
def pyvmm_timeout_scale(request: pytest.FixtureRequest) -> float:
    return request.config.getoption("--pyvmm-timeout-scale")


@pytest.fixture(scope=_vm_scope)
def pyvmm_vm_options(request: pytest.FixtureRequest) -> dict[str, Any]:
    """pyvmm.VM keyword arguments from the `pyvmm` markers on the fixture's node (the module,
    for the default scope); override this fixture to configure the VM in code."""
    options: dict[str, Any] = {}
    for mark in reversed(list(request.node.iter_markers(MARKER))):
        options.update(mark.kwargs)
    return options


def _initrd_for(kernel: KernelParam, config: pytest.Config) -> Path | None:
    if config.getoption("--pyvmm-initrd"):
        return Path(config.getoption("--pyvmm-initrd"))
    if kernel.path is None:
        return None  # the default guest brings its own
    import guest_images

    img = guest_images.default_image()
    return img.initramfs if guest_images.is_built(img) else None


@pytest.fixture(scope=_vm_scope)
def pyvmm_vm(request: pytest.FixtureRequest, pyvmm_kernel: KernelParam, pyvmm_vm_options: dict[str, Any],
             pyvmm_timeout_scale: float, tmp_path_factory: pytest.TempPathFactory):
    """A booted pyvmm.VM for this kernel; with the agent ready unless wait_agent=False."""
    import pyvmm

    options = dict(pyvmm_vm_options)
    wait_agent = options.pop("wait_agent", True)
    append = " ".join(filter(None, [request.config.getoption("--pyvmm-append"), options.pop("append", "")]))
    log = tmp_path_factory.mktemp(f"pyvmm-{pyvmm_kernel.id}") / "console.log"
    vm = pyvmm.VM(kernel=pyvmm_kernel.path, initrd=_initrd_for(pyvmm_kernel, request.config), append=append,
                  boot_timeout=waits.BOOT_TIMEOUT_S * pyvmm_timeout_scale, log_path=log, **options)
    with vm:
        if wait_agent:
            vm.agent  # noqa: B018 - waits for the agent's READY line
        yield vm


class Waiter:
    """`pyvmm_wait`: wait for a device's size or state; a timeout fails the test with what
    was expected and what was last seen."""

    def __init__(self, vm: Any, scale: float = 1.0) -> None:
        self.vm = vm
        self.scale = scale

    def until(self, predicate: Callable[[], Any], timeout: float, expected: str,
              seen: Callable[[], str] | None = None) -> Any:
        return waits.wait_until(predicate, timeout * self.scale, expected, seen,
                                alive=lambda: self.vm.returncode)

    def virtio_mem_plugged(self, device_id: str, size: int, timeout: float | None = None) -> None:
        """Until virtio-mem `device_id` reports `size` bytes plugged."""
        handle = self.vm.virtio_mem[device_id]
        if timeout is None:
            timeout = waits.size_timeout(size - handle.plugged, waits.PLUG_BASE_S, waits.PLUG_PER_128M_S)
        self.until(lambda: handle.plugged == size, timeout, f"virtio-mem {device_id} at {waits.mib(size)} plugged",
                   lambda: f"{waits.mib(handle.plugged)} plugged")

    def balloon_actual(self, size: int, timeout: float | None = None) -> None:
        """Until hv-balloon reports the guest at `size` bytes."""
        handle = self.vm.hv_balloon
        if timeout is None:
            timeout = waits.size_timeout(size - handle.actual, waits.HOT_ADD_BASE_S, waits.HOT_ADD_PER_128M_S)
        self.until(lambda: handle.actual == size, timeout, f"hv-balloon at {waits.mib(size)}",
                   lambda: f"actual {waits.mib(handle.actual)}")

    def driver_bound(self, driver: str, timeout: float = waits.DRIVER_BIND_TIMEOUT_S) -> dict:
        """Until the guest lists a device with `driver` bound; returns that device."""
        found: list[dict] = []

        def bound() -> dict | None:
            found[:] = self.vm.agent.devices()
            return next((d for d in found if d.get("driver") == driver), None)
        return self.until(bound, timeout, f"a guest device bound to {driver}",
                          lambda: ", ".join(f"{d['name']}={d.get('driver')}" for d in found) or "no devices")

    def memtotal(self, predicate: Callable[[int], bool], timeout: float, expected: str) -> int:
        """Until predicate(MemTotal) holds; returns MemTotal."""
        last: list[int] = [0]

        def check() -> bool:
            last[0] = self.vm.agent.meminfo()["MemTotal"]
            return predicate(last[0])
        self.until(check, timeout, expected, lambda: f"MemTotal {last[0]}")
        return last[0]


@pytest.fixture
def pyvmm_wait(pyvmm_vm: Any, pyvmm_timeout_scale: float) -> Waiter:
    return Waiter(pyvmm_vm, pyvmm_timeout_scale)


# ---------------------------------------------------------------------- the kit as tests
@pytest.fixture(scope="module")
def pyvmm_kit_context(request: pytest.FixtureRequest, pyvmm_kernel: KernelParam, pyvmm_timeout_scale: float,
                      tmp_path_factory: pytest.TempPathFactory):
    """A kit's booted guest and scenario context (the kit name is the fixture's param):
    static kernel probe, boot, runtime driver check, as `pyvmm check` does them."""
    from pyvmm.check.kernel_probe import probe_kernel
    from pyvmm.check.registry import REGISTRY

    kit = REGISTRY.kit(request.param)
    if pyvmm_kernel.path is not None:
        report = probe_kernel(pyvmm_kernel.path, kit.requirements)
        if report.failures:
            pytest.fail(report.failure_text(), pytrace=False)
    log = tmp_path_factory.mktemp(f"pyvmm-{kit.name}-{pyvmm_kernel.id}") / "console.log"
    vm = kit.boot(pyvmm_kernel.path, _initrd_for(pyvmm_kernel, request.config),
                  request.config.getoption("--pyvmm-append"), pyvmm_timeout_scale, log)
    try:
        ctx = kit.context(vm, pyvmm_timeout_scale)
        try:
            ctx.setup()
        except CheckFailed as e:
            pytest.fail(f"{kit.name} runtime check: {e}", pytrace=False)
        yield ctx
    finally:
        vm.close()


def kit_tests(kit: str, scenarios: list[str] | None = None) -> Callable[..., None]:
    """A test function running each scenario of `kit` as its own test, on one guest per
    module and kernel:

        from pyvmm.pytest_plugin import kit_tests
        test_virtio_mem = kit_tests("virtio-mem")
    """
    from pyvmm.check.registry import REGISTRY

    selected = REGISTRY.select(kit, scenarios)
    by_name = {sc.name: sc for sc in selected}

    @pytest.mark.parametrize("pyvmm_scenario", list(by_name))
    @pytest.mark.parametrize("pyvmm_kit_context", [kit], indirect=True, ids=[kit])
    def run_scenario(pyvmm_kit_context: Any, pyvmm_scenario: str) -> None:
        ctx = pyvmm_kit_context
        sc = by_name[pyvmm_scenario]
        ctx.begin()
        try:
            ctx.prepare()
            sc(ctx)
        except ScenarioSkipped as e:
            pytest.skip(str(e))
        except Exception:
            if ctx.vm.returncode is None:
                try:
                    ctx.settle()  # the next scenario starts from the baseline
                except Exception:
                    pass
            raise

    run_scenario.__doc__ = f"The pyvmm check {kit} scenarios, one test each."
    return run_scenario
