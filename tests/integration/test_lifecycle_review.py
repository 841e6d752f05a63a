"""Reviewer findings: broken definition files keep the last good definition, status of a
running VM shows what it runs with, start failures read well, logs of forgotten VMs."""

from __future__ import annotations

import pytest

from supervisord_vm.errors import NoSuchMachine
from supervisord_vm.model import Reason, State
from tests.integration.lifecycle_env import Env, show
from tests.integration.test_lifecycle import assert_gone, run, started

pytestmark = pytest.mark.integration


def test_broken_file_on_reload_keeps_the_last_good_definition() -> None:
    async def body(env: Env) -> None:
        sup = env.supervisor
        await sup.define(env.toml("fresh"))
        pid = await started(env, "r1")
        defs = env.paths.definitions_dir
        for name in ("fresh", "r1"):
            with defs.joinpath(f"{name}.toml").open("a") as stream:
                stream.write("memroy = 1\n")
        report = await sup.reload()
        assert (report.added, report.removed, report.changed) == ([], [], [])
        assert len(report.errors) == 2
        for name in ("fresh", "r1"):
            (message,) = [e for e in report.errors if f"{name}.toml" in e]
            assert "memroy" in message
            assert f"VM {name} keeps its last good definition" in message
        fresh = sup.get_machine("fresh")
        assert (fresh.state, fresh.transient) == (State.SHUTOFF, False)
        r1 = sup.get_machine("r1")
        assert (r1.state, r1.pid, r1.transient) == (State.RUNNING, pid, False)

        # Fixed: no "added"; a changed content is "changed"; only a file that is gone removes.
        defs.joinpath("fresh.toml").write_text(env.toml("fresh"))
        defs.joinpath("r1.toml").write_text(env.toml("r1", stop_timeout=7))
        report = await sup.reload()
        assert (report.added, report.removed, report.changed, report.errors) == (
            [],
            [],
            ["r1"],
            [],
        )
        defs.joinpath("fresh.toml").unlink()
        report = await sup.reload()
        assert report.removed == ["fresh"]
        with pytest.raises(NoSuchMachine):
            sup.get_machine("fresh")

        # Daemon start-up with a broken file for a running VM: reattached, still defined.
        with defs.joinpath("r1.toml").open("a") as stream:
            stream.write("memroy = 1\n")
        await sup.close()
        again = await env.new_supervisor()
        r1 = again.get_machine("r1")
        assert (r1.state, r1.pid, r1.transient) == (State.RUNNING, pid, False)
        assert r1.stop_timeout == 10  # the definition it was started with
        info = await again.destroy("r1")
        assert (info.state, info.reason, info.transient) == (State.SHUTOFF, Reason.DESTROYED, False)
        assert again.get_machine("r1").reason is Reason.DESTROYED  # not forgotten
        await assert_gone(env, "r1")

    run(body)


def test_status_of_a_running_vm_shows_what_it_runs_with() -> None:
    async def body(env: Env) -> None:
        sup = env.supervisor
        await started(env, "sd", stop_timeout=5)
        info = await sup.define(env.toml("sd", stop_timeout=7, restart="on-crash"))
        assert (await show("svm-sd.scope", "TimeoutStopUSec"))["TimeoutStopUSec"] == "5s"
        assert info.stop_timeout == 5  # the scope's, until the next start
        assert info.restart == "on-crash"  # a daemon policy: in effect at once
        assert sup.get_machine("sd").stop_timeout == 5
        assert (await sup.destroy("sd")).stop_timeout == 7
        await sup.start("sd")
        assert (await show("svm-sd.scope", "TimeoutStopUSec"))["TimeoutStopUSec"] == "7s"
        assert sup.get_machine("sd").stop_timeout == 7
        await sup.destroy("sd")
        await assert_gone(env, "sd")

    run(body)
