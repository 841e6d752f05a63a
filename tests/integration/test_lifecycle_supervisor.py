"""Supervisor-level behaviour beyond the issue's list: reboot, reload, autostart once per boot,
and reattach to a scope whose runtime record is missing."""

from __future__ import annotations

import json
import os
import time

import pytest

from supervisord_vm.model import Caller, EventType, Reason, State
from supervisord_vm.supervisor import AUDIT_MESSAGE_ID, MESSAGE_IDS
from tests.integration.lifecycle_env import Env, run_cmd, show, wait_gone
from tests.integration.test_lifecycle import assert_gone, guest_booted, run, started

pytestmark = pytest.mark.integration


def test_reboot_returns_at_once_and_resets_in_the_same_qemu() -> None:
    async def body(env: Env) -> None:
        pid = await started(env, "rb1")
        await guest_booted()
        mark = len(env.events.events)
        begin = time.monotonic()
        await env.supervisor.reboot("rb1")
        assert time.monotonic() - begin < 0.5  # delivered, not waited for
        rebooted = await env.events.wait_for(
            lambda e: e.name == "rb1" and e.event is EventType.REBOOTED, start=mark
        )
        assert rebooted.state is State.RUNNING
        info = env.supervisor.get_machine("rb1")
        assert (info.state, info.pid) == (State.RUNNING, pid)
        kinds = [e.event for e in env.events.events[mark:] if e.name == "rb1"]
        assert EventType.STOPPED not in kinds
        assert EventType.PAUSED not in kinds  # the pause on power-off is internal
        assert (await show("svm-rb1.scope", "ActiveState"))["ActiveState"] == "active"
        await guest_booted()  # the guest booted again and answers the power button again
        info = await env.supervisor.shutdown("rb1", timeout=30)
        assert info.reason is Reason.SHUTDOWN  # set-action was restored to poweroff
        await assert_gone(env, "rb1")

    run(body)


def test_shutdown_after_an_unanswered_reboot_really_powers_off() -> None:
    async def body(env: Env) -> None:
        pid = await started(env, "rb2")
        await env.supervisor.reboot("rb2")  # still booting: the button press is lost
        assert env.supervisor.get_machine("rb2").pid == pid
        await guest_booted()
        info = await env.supervisor.shutdown("rb2", timeout=30)
        assert (info.state, info.reason) == (State.SHUTOFF, Reason.SHUTDOWN)
        assert EventType.REBOOTED not in [e for e, _ in env.events.of("rb2")]
        await wait_gone(pid)
        await assert_gone(env, "rb2")

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


async def journal_entries(**match: str) -> list[dict[str, str]]:
    """The daemon's journal entries matching FIELD=value, as `journalctl -o json` gives them."""
    await run_cmd("journalctl", "--sync")
    match = {"_PID": str(os.getpid()), **match}  # this test's supervisor, not an earlier run
    out = await run_cmd(
        "journalctl",
        "-o",
        "json",
        "--no-pager",
        *(f"{key}={value}" for key, value in match.items()),
    )
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_journal_has_the_lifecycle_entry_and_the_audit_entry() -> None:
    async def body(env: Env) -> None:
        await started(env, "jr1")
        caller = Caller(uid=4242, pid=os.getpid())
        await env.supervisor.destroy("jr1", caller=caller)
        await assert_gone(env, "jr1")
        stops = await journal_entries(VM_NAME="jr1", VM_EVENT="stopped")
        assert len(stops) == 1, stops
        stop = stops[0]
        assert stop["VM_UNIT"] == "svm-jr1.scope"
        assert stop["VM_REASON"] == "destroyed"
        assert stop["MESSAGE_ID"] == MESSAGE_IDS[EventType.STOPPED]
        assert stop["SYSLOG_IDENTIFIER"] == "supervisord-vm"
        assert "jr1" in stop["MESSAGE"]
        audits = await journal_entries(
            MESSAGE_ID=AUDIT_MESSAGE_ID, VM_NAME="jr1", VM_OPERATION="destroy"
        )
        assert len(audits) == 1, audits
        audit = audits[0]
        assert (audit["CALLER_UID"], audit["CALLER_PID"]) == ("4242", str(os.getpid()))
        assert audit["VM_RESULT"] == "ok"
        assert "destroy jr1 by uid 4242" in audit["MESSAGE"]

    run(body)
