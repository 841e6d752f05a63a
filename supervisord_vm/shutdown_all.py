"""Host-shutdown policy: power every running VM off in parallel, destroy the ones that ignore it.

Kept apart from the bus so the policy (bounded parallelism, one deadline per VM, destroy after
it) is plain core logic that a test or another front end can call.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from supervisord_vm.errors import Busy, NotRunning, SvmError
from supervisord_vm.model import Caller, DestroyMode, MachineInfo, State

if TYPE_CHECKING:
    from supervisord_vm.supervisor import Supervisor

log = logging.getLogger(__name__)

_ACTIVE = (State.STARTING, State.RUNNING, State.PAUSED, State.STOPPING)


async def _destroy(
    supervisor: Supervisor, name: str, grace: float, caller: Caller | None
) -> MachineInfo:
    """SIGTERM, then SIGKILL after ``grace`` — by KillUnit, never StopUnit.

    During host shutdown this runs inside supervisord-vm-guests.service's ExecStop, and every
    scope is ordered Before= that unit: a stop job for a scope would wait for the guests unit to
    finish stopping, which waits for us — a deadlock until the unit's TimeoutStopSec.
    """
    try:
        return await supervisor.destroy(name, DestroyMode.GRACEFUL, grace, caller)
    except Busy:
        return await supervisor.destroy(name, DestroyMode.FORCE, None, caller)


async def shutdown_all(
    supervisor: Supervisor,
    timeout: float | None,  # noqa: ASYNC109 - each VM's own deadline, not ours
    parallel: int,
    caller: Caller | None = None,
) -> dict[str, str]:
    """Shut down every active VM; returns name -> outcome ("shutdown", "destroyed", "error: ...").

    ``parallel`` VMs at a time (0 = all at once); each gets ``timeout`` seconds (None = its own
    stop timeout) to power off after the ACPI button before it is destroyed.
    """
    names = [m.name for m in supervisor.list_machines() if m.state in _ACTIVE]
    limit = asyncio.Semaphore(parallel if parallel > 0 else max(1, len(names)))
    results: dict[str, str] = {}

    async def one(name: str) -> None:
        async with limit:
            info = supervisor.get_machine(name)
            wait = timeout if timeout is not None else float(info.stop_timeout)
            try:
                try:
                    if info.state == State.PAUSED:
                        await supervisor.resume(name, caller)
                    info = await supervisor.shutdown(name, wait, False, caller)
                except NotRunning:
                    raise
                except SvmError as exc:
                    # Timed out, or cannot be powered off at all (a wedged QEMU, a start or a
                    # destroy in progress): the host is going down, so the VM is ended.
                    log.info("shutdown-all: destroying VM %s: %s", name, exc)
                    info = await _destroy(supervisor, name, float(info.stop_timeout), caller)
            except NotRunning:
                results[name] = "shutdown"
                return
            except SvmError as exc:
                results[name] = f"error: {exc}"
                return
            results[name] = str(info.reason) or "shutdown"

    await asyncio.gather(*(one(name) for name in names))
    return results
