"""Reviewer findings: broken definition files keep the last good definition, status of a
running VM shows what it runs with, start failures read well, logs of forgotten VMs."""

from __future__ import annotations

import pytest

from supervisord_vm.errors import NoSuchMachine, StartFailed
from supervisord_vm.model import Reason, State
from tests.integration.lifecycle_env import Env, show
from tests.integration.test_lifecycle import assert_failed_start, assert_gone, run, started

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


def test_start_failures_name_the_problem_in_words() -> None:
    async def body(env: Env) -> None:
        sup = env.supervisor
        script = env.base / "not-a-program"
        script.write_text("this is text, not a program\n")
        script.chmod(0o755)
        with pytest.raises(StartFailed) as caught:
            await sup.create(env.toml("r6", extra=f'qemu = "{script}"'))
        message = str(caught.value)
        assert message == (
            f"cannot start VM r6: QEMU binary {script} is not an executable program "
            "(Exec format error)"
        )
        await assert_failed_start(env, "r6", transient=True)
        assert not env.paths.log_dir.joinpath("r6.log").exists()  # QEMU never ran

        with pytest.raises(StartFailed, match=r"/usr/bin is a directory, not an executable"):
            await sup.create(env.toml("r7", extra='qemu = "/usr/bin"'))
        await assert_failed_start(env, "r7", transient=True)

        script.chmod(0o644)
        with pytest.raises(StartFailed, match="is not executable") as caught:
            await sup.create(env.toml("r8", extra=f'qemu = "{script}"'))
        assert "Errno" not in str(caught.value)
        await assert_failed_start(env, "r8", transient=True)

    run(body)


def test_log_of_a_forgotten_transient_vm_stays_readable() -> None:
    async def body(env: Env) -> None:
        sup = env.supervisor
        with pytest.raises(StartFailed):
            await sup.create(env.toml("gonelog", extra='extra_args = ["-bogus-option"]'))
        with pytest.raises(NoSuchMachine):
            sup.get_machine("gonelog")
        # QEMU ran and wrote to the journal: still served (by read_log, from the journal).
        assert b"bogus-option" in sup.read_log("gonelog", 1 << 20)
        with pytest.raises(NoSuchMachine):
            sup.read_log("neverwas", 1 << 20)
        with pytest.raises(NoSuchMachine):
            sup.read_log("../etc/passwd", 1 << 20)
        with pytest.raises(StartFailed):
            await sup.create(env.toml("nolog", extra='qemu = "/usr/bin"'))
        assert not env.paths.log_dir.joinpath("nolog.log").exists()
        with pytest.raises(NoSuchMachine):
            sup.read_log("nolog", 1 << 20)
        await sup.define(env.toml("known"))
        assert sup.log_path("known") == env.paths.log_dir / "known.log"  # known, no log yet

    run(body)
