"""Supervisor-level behaviour beyond the issue's list: reboot, reload, autostart once per boot,
and reattach to a scope whose runtime record is missing."""

from __future__ import annotations

import pytest

from supervisord_vm.model import EventType, Reason, State
from tests.integration.lifecycle_env import Env, run_cmd, show, wait_gone
from tests.integration.test_lifecycle import assert_gone, guest_booted, run, started

pytestmark = pytest.mark.integration


def test_reboot_is_acpi_power_off_then_reset_in_the_same_qemu() -> None:
    async def body(env: Env) -> None:
        pid = await started(env, "rb1")
        await guest_booted()
        await env.supervisor.reboot("rb1")
        info = env.supervisor.get_machine("rb1")
        assert (info.state, info.pid) == (State.RUNNING, pid)
        kinds = [e for e, _ in env.events.of("rb1")]
        assert EventType.REBOOTED in kinds
        assert EventType.STOPPED not in kinds
        assert (await show("svm-rb1.scope", "ActiveState"))["ActiveState"] == "active"
        await guest_booted()  # the guest booted again and answers the power button again
        info = await env.supervisor.shutdown("rb1", timeout=30)
        assert info.reason is Reason.SHUTDOWN  # set-action was restored to poweroff
        await assert_gone(env, "rb1")

    run(body)


def test_reload_reports_and_keeps_running_vms() -> None:
    async def body(env: Env) -> None:
        await env.supervisor.define(env.toml("keep"))
        await env.supervisor.define(env.toml("edit"))
        pid = await started(env, "gone")
        defs = env.paths.definitions_dir
        defs.joinpath("new.toml").write_text(env.toml("new"))
        defs.joinpath("edit.toml").write_text(env.toml("edit", stop_timeout=5))
        defs.joinpath("gone.toml").unlink()
        defs.joinpath("bad.toml").write_text('name = "bad"\nmemroy = 1\n')
        report = await env.supervisor.reload()
        assert (report.added, report.removed, report.changed) == (["new"], ["gone"], ["edit"])
        assert len(report.errors) == 1
        assert "memroy" in report.errors[0]
        info = env.supervisor.get_machine("gone")
        assert (info.state, info.pid, info.transient) == (State.RUNNING, pid, True)
        assert env.supervisor.get_machine("edit").stop_timeout == 5
        await env.supervisor.destroy("gone")
        assert "gone" not in [m.name for m in env.supervisor.list_machines()]
        await assert_gone(env, "gone")

    run(body)


def test_autostart_once_per_boot() -> None:
    async def body(env: Env) -> None:
        await env.supervisor.define(env.toml("auto", extra="autostart = true"))
        await env.supervisor.close()
        again = await env.new_supervisor()  # same boot: autostart already ran
        assert again.get_machine("auto").state is State.SHUTOFF
        await again.close()
        env.paths.state_dir.joinpath("autostart-boot-id").unlink()  # as after a host reboot
        booted = await env.new_supervisor()
        info = booted.get_machine("auto")
        assert info.state is State.RUNNING
        await booted.close()
        restarted = await env.new_supervisor()  # a daemon restart reattaches, starts nothing
        assert restarted.get_machine("auto").pid == info.pid
        assert await env.systemd.unit_pids("svm-auto.scope") == [info.pid]
        await restarted.destroy("auto")
        await assert_gone(env, "auto")

    run(body)


def test_scope_without_record_is_reattached_or_stopped() -> None:
    async def body(env: Env) -> None:
        pid = await started(env, "norec")
        orphan = await started(env, "orphan")
        await env.supervisor.close()
        env.paths.runtime_dir.joinpath("norec.json").unlink()
        env.paths.runtime_dir.joinpath("orphan.json").unlink()
        env.paths.definitions_dir.joinpath("orphan.toml").unlink()
        fresh = await env.new_supervisor()
        assert (fresh.get_machine("norec").state, fresh.get_machine("norec").pid) == (
            State.RUNNING,
            pid,
        )
        assert env.paths.runtime_dir.joinpath("norec.json").exists()  # record rewritten
        assert (await show("svm-orphan.scope", "LoadState"))["LoadState"] == "not-found"
        assert "orphan" not in [m.name for m in fresh.list_machines()]
        await wait_gone(orphan)
        await fresh.destroy("norec")
        await assert_gone(env, "norec")
        assert (
            await run_cmd("systemctl", "list-units", "--failed", "--plain", "--no-legend")
        ) == ""

    run(body)
