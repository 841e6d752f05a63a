"""Resource control and autostart order on a real systemd (issue 11, parts 3 and 4).

The scope carries every [resources] value as systemd shows it; a VM in its own slice is in that
slice (made on demand, with its parents); an administrator's `systemctl set-property` shows in
`svmctl status`, survives a daemon restart, and lasts until the VM stops. Autostart across a
simulated boot (the boot ID mark removed) follows autostart_after and autostart_delay.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisord_vm.api import machine_path
from supervisord_vm.autostart_order import NamedByOthers
from supervisord_vm.errors import InvalidDefinition
from supervisord_vm.model import EventType, MachineEvent, State
from tests.integration.lifecycle_env import Env, run_cmd, show
from tests.integration.test_lifecycle import assert_gone, run
from tests.integration.test_service import (
    ACPI_IMAGE,
    definition,
    service,
    sh,
    status,
    svm,
    wait_for,
)

pytestmark = pytest.mark.integration
__all__ = ["service"]  # the module fixture of test_service (make install + start)

RESOURCES = (
    '[resources]\ncpu_weight = 200\ncpu_quota = 50\nmemory_high = "256M"\n'
    'memory_max = "512M"\nio_weight = 300\ntasks_max = 64\nallowed_cpus = "0-1"\n'
)
SHOWN = (
    "CPUWeight",
    "CPUQuotaPerSecUSec",
    "MemoryHigh",
    "MemoryMax",
    "IOWeight",
    "TasksMax",
    "AllowedCPUs",
    "Slice",
    "ControlGroup",
)


async def stop_slices(*slices: str) -> None:
    """Slices made on demand stay active once empty (as after systemd-run --slice=)."""
    await run_cmd("systemctl", "stop", *slices)


def test_scope_shows_every_resource_value_and_its_own_slice() -> None:
    async def body(env: Env) -> None:
        extra = RESOURCES + 'slice = "svmres-a-web.slice"\n'
        await env.supervisor.define(env.toml("rs1", extra=extra))
        await env.supervisor.define(env.toml("rs2"))  # no [resources]: the daemon's slice
        try:
            await env.supervisor.start("rs1")
            await env.supervisor.start("rs2")
            assert await show("svm-rs1.scope", *SHOWN) == {
                "CPUWeight": "200",
                "CPUQuotaPerSecUSec": "500ms",
                "MemoryHigh": str(256 << 20),
                "MemoryMax": str(512 << 20),
                "IOWeight": "300",
                "TasksMax": "64",
                "AllowedCPUs": "0-1",
                "Slice": "svmres-a-web.slice",
                # '-' nests: the slice and its parents were made on demand
                "ControlGroup": "/svmres.slice/svmres-a.slice/svmres-a-web.slice/svm-rs1.scope",
            }
            for slice_name in ("svmres.slice", "svmres-a.slice", "svmres-a-web.slice"):
                shown = await show(slice_name, "LoadState", "ActiveState", "FragmentPath")
                assert shown == {"LoadState": "loaded", "ActiveState": "active", "FragmentPath": ""}
            found = await env.supervisor.resources_in_force("rs1")
            assert found is not None
            assert (found.cpu_weight, found.cpu_quota_per_sec_usec, found.tasks_max) == (
                200,
                500_000,
                64,
            )
            assert (found.memory_high, found.memory_max, found.io_weight) == (
                256 << 20,
                512 << 20,
                300,
            )
            assert (found.allowed_cpus, found.slice) == ("0-1", "svmres-a-web.slice")

            plain = await show("svm-rs2.scope", "Slice", "CPUWeight", "MemoryMax", "AllowedCPUs")
            assert plain == {
                "Slice": "machine.slice",
                "CPUWeight": "[not set]",
                "MemoryMax": "infinity",
                "AllowedCPUs": "",
            }
            found = await env.supervisor.resources_in_force("rs2")
            assert found is not None
            assert (found.slice, found.cpu_weight, found.memory_max) == (
                "machine.slice",
                None,
                None,
            )
            # systemd's DefaultTasksMax is a limit in force although the definition sets none
            assert found.tasks_max is not None

            # A daemon restart finds the VM in its own slice and leaves its limits as they are.
            pid = env.supervisor.get_machine("rs1").pid
            await env.supervisor.close()
            again = await env.new_supervisor()
            assert (again.get_machine("rs1").state, again.get_machine("rs1").pid) == (
                State.RUNNING,
                pid,
            )
            assert (await show("svm-rs1.scope", "CPUWeight"))["CPUWeight"] == "200"
            for name in ("rs1", "rs2"):
                await env.supervisor.destroy(name)
                await assert_gone(env, name)
            assert await env.supervisor.resources_in_force("rs1") is None  # shut off: none
        finally:
            await stop_slices("svmres.slice")

    run(body)


# --- autostart order ----------------------------------------------------------------------------


def first(events: list[MachineEvent], name: str, kind: EventType) -> int:
    return next(i for i, e in enumerate(events) if e.name == name and e.event is kind)


def test_autostart_follows_the_order_and_the_delay_across_a_boot() -> None:
    async def body(env: Env) -> None:
        sup = env.supervisor
        await sup.define(env.toml("db", extra="autostart = true\nautostart_delay = 2"))
        await sup.define(env.toml("off"))  # named, but not autostarted: nobody waits for it
        await sup.define(env.toml("app", extra='autostart = true\nautostart_after = ["db"]'))
        await sup.define(
            env.toml("web", extra='autostart = true\nautostart_after = ["app", "db", "off"]')
        )
        await sup.define(env.toml("solo", extra="autostart = true"))
        await sup.define(env.toml("bad", extra="autostart = true", disk="/nonexistent/disk.img"))
        await sup.define(env.toml("afterbad", extra='autostart = true\nautostart_after = ["bad"]'))
        # Define refuses what autostart could not order.
        with pytest.raises(InvalidDefinition, match="'ghost', which is not a defined VM"):
            await sup.define(env.toml("x1", extra='autostart_after = ["ghost"]'))
        with pytest.raises(InvalidDefinition, match="db -> web -> db would be a cycle"):
            await sup.define(env.toml("db", extra='autostart_after = ["web"]'))
        with pytest.raises(NamedByOthers, match="VM app, web autostart after it"):
            await sup.undefine("db")
        # Hand-edited files may still hold a cycle: reported, and autostarted all the same.
        defs = env.paths.definitions_dir
        defs.joinpath("cy1.toml").write_text(
            env.toml("cy1", extra='autostart = true\nautostart_after = ["cy2"]')
        )
        defs.joinpath("cy2.toml").write_text(
            env.toml("cy2", extra='autostart = true\nautostart_after = ["cy1"]')
        )
        report = await sup.reload()
        assert any("cy1, cy2 name each other" in problem for problem in report.errors)
        await sup.close()

        env.paths.state_dir.joinpath("autostart-boot-id").unlink(missing_ok=True)  # a new boot
        mark = len(env.events.events)
        booted = await env.new_supervisor()
        events = env.events.events[mark:]
        running = {"db", "app", "web", "solo", "afterbad", "cy1", "cy2"}
        try:
            for name in running:
                assert booted.get_machine(name).state is State.RUNNING, name
            assert booted.get_machine("off").state is State.SHUTOFF
            assert booted.get_machine("bad").state is State.SHUTOFF  # its start failed ...
            # ... and its dependent started anyway, after the failure
            assert first(events, "bad", EventType.STOPPED) < first(
                events, "afterbad", EventType.STARTING
            )
            db_up = events[first(events, "db", EventType.STARTED)]
            app_starting = events[first(events, "app", EventType.STARTING)]
            assert first(events, "db", EventType.STARTED) < first(events, "app", EventType.STARTING)
            assert first(events, "app", EventType.STARTED) < first(
                events, "web", EventType.STARTING
            )
            assert app_starting.time - db_up.time >= 2 - 0.1  # db's autostart_delay
            # independent VMs did not wait for db's delay
            assert first(events, "solo", EventType.STARTING) < first(
                events, "app", EventType.STARTING
            )
        finally:
            for name in running:
                if booted.get_machine(name).state is not State.SHUTOFF:
                    await booted.destroy(name)
        for name in running:
            await assert_gone(env, name)

    run(body)


# --- an administrator's set-property, through the installed service -----------------------------


@pytest.fixture
def limited_vm(service: None) -> Iterator[str]:
    name = "rsvc"
    path = Path(f"/run/{name}.toml")
    path.write_text(definition(name, ACPI_IMAGE) + "\n[resources]\ncpu_weight = 200\n")
    result = svm("define", str(path))
    assert result.returncode == 0, result.stderr
    try:
        yield name
    finally:
        svm("destroy", "--force", name)
        svm("undefine", name)
        path.unlink(missing_ok=True)


def scope_dropins(name: str) -> list[str]:
    found = Path(f"/run/systemd/transient/svm-{name}.scope.d")
    return sorted(p.name for p in found.iterdir()) if found.is_dir() else []


def test_set_property_shows_in_status_and_lasts_until_the_vm_stops(limited_vm: str) -> None:
    name = limited_vm
    unit = f"svm-{name}.scope"
    assert svm("start", name).returncode == 0
    before = status(name)["resources"]
    assert isinstance(before, dict)
    assert (before["cpu_weight"], before["memory_max"], before["slice"]) == (
        200,
        None,
        "machine.slice",
    )

    # Persistent or --runtime: on a transient scope both land in /run/systemd/transient.
    sh("systemctl", "set-property", unit, "CPUWeight=333", "MemoryMax=1G", check=True)
    sh("systemctl", "set-property", "--runtime", unit, "TasksMax=77", check=True)
    assert scope_dropins(name) == ["50-CPUWeight.conf", "50-MemoryMax.conf", "50-TasksMax.conf"]
    changed = status(name)["resources"]
    assert isinstance(changed, dict)
    assert (changed["cpu_weight"], changed["memory_max"], changed["tasks_max"]) == (
        333,
        1 << 30,
        77,
    )
    text = svm("status", name).stdout
    assert "CPU weight: 333" in text
    assert "Memory max: 1G" in text

    # The daemon never undoes it: not on a restart (reattach) either.
    sh("systemctl", "restart", "supervisord-vm.service", check=True)
    again = status(name)
    assert again["state"] == "running"
    assert isinstance(again["resources"], dict)
    assert again["resources"]["cpu_weight"] == 333
    assert sh("systemctl", "show", "-P", "CPUWeight", unit).stdout.strip() == "333"

    # A stop ends it: the next start has the definition's values again.
    assert svm("destroy", name).returncode == 0
    assert scope_dropins(name) == []
    assert status(name)["resources"] is None  # shut off: no limits in force
    assert svm("start", name).returncode == 0
    restarted = status(name)["resources"]
    assert isinstance(restarted, dict)
    assert (restarted["cpu_weight"], restarted["memory_max"]) == (200, None)


def test_status_json_of_a_running_vm_names_every_limit(limited_vm: str) -> None:
    assert svm("start", limited_vm).returncode == 0
    shown = json.loads(svm("--json", "status", limited_vm).stdout)["resources"]
    assert set(shown) == {
        "slice",
        "control_group",
        "cpu_weight",
        "cpu_quota",
        "memory_high",
        "memory_max",
        "io_weight",
        "tasks_max",
        "allowed_cpus",
    }
    assert shown["control_group"] == f"/machine.slice/svm-{limited_vm}.scope"
    busctl = subprocess.run(
        [
            "busctl",
            "--json=short",
            "call",
            "org.supervisordvm1",
            machine_path(limited_vm),
            "org.supervisordvm1.Machine",
            "GetResources",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert busctl.returncode == 0, busctl.stderr
    values = json.loads(busctl.stdout)["data"][0]
    assert values["CPUWeight"] == {"type": "t", "data": 200}
    assert "MemoryMax" not in values  # not set: left out


def test_installed_daemon_is_ready_before_a_delayed_autostart(service: None) -> None:
    """READY=1 (systemctl restart returns) comes before autostart, whose delays may be long."""
    names = ("rsdb", "rsapp")
    texts = {
        "rsdb": definition("rsdb", ACPI_IMAGE, autostart="true", autostart_delay="10"),
        "rsapp": definition("rsapp", ACPI_IMAGE, autostart="true", autostart_after='["rsdb"]'),
    }
    try:
        for name in names:
            path = Path(f"/run/{name}.toml")
            path.write_text(texts[name])
            result = svm("define", str(path))
            assert result.returncode == 0, result.stderr
        Path("/var/lib/supervisord-vm/autostart-boot-id").unlink(missing_ok=True)  # a new boot
        sh("systemctl", "restart", "supervisord-vm.service", check=True)
        assert status("rsapp")["state"] == "shutoff"  # waiting for rsdb and its 10 s
        wait_for(lambda: status("rsapp")["state"] == "running", timeout=90, what="rsapp running")
        assert status("rsdb")["state"] == "running"
    finally:
        for name in names:
            svm("destroy", "--force", name)
        for name in reversed(names):  # rsdb only once nothing autostarts after it
            svm("undefine", name)
            Path(f"/run/{name}.toml").unlink(missing_ok=True)
