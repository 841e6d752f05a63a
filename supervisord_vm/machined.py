"""Running VMs registered with systemd-machined, so that `machinectl` lists and stops them.

RegisterMachine (class ``vm``, leader = QEMU's PID) makes machined adopt the unit its leader
already runs in: no second scope is created (checked on systemd 252: ``machinectl show NAME``
gives ``Unit=svm-NAME.scope``), and machined drops the machine by itself when that scope ends.
Registration is a convenience for administrators, never a condition for running: a VM whose
name machined refuses, a host without machined, or a machined that does not answer leaves the
VM running unregistered, and the daemon says why once (per VM; "no machined" once per daemon).

Facts of systemd 252 this module works around (checked in the sandbox):
- machine names follow hostname_is_valid(): letters, digits, '-' and '.', at most 64
  characters, no empty part between dots, no part beginning or ending with '-'. A VM name with
  '_' (allowed by definitions) is refused with InvalidArgs "Invalid machine name".
- A RegisterMachine whose leader is already registered under another name fails (FileExists),
  and machined's cleanup of the failed machine then *stops the leader's scope* and forgets the
  other machine's unit, which then stays listed after it ends. So this module never registers
  a PID machined already knows: GetMachineByPID comes first.
- UnregisterMachine forgets a machine without touching its processes; it clears a registration
  of ours left over from an earlier run of the same VM.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any

from sdbus.sd_bus_internals import SdBusBaseError

from supervisord_vm.systemd import Systemd, error_name
from supervisord_vm.unitname import machine_uuid as machine_uuid  # noqa: PLC0414 - API

log = logging.getLogger(__name__)

MACHINED = "org.freedesktop.machine1"
_MANAGER_PATH = "/org/freedesktop/machine1"
_MANAGER_IFACE = "org.freedesktop.machine1.Manager"
_MACHINE_IFACE = "org.freedesktop.machine1.Machine"
_PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"
SERVICE = "supervisord-vm"  # the Service= machined shows for our VMs
MACHINE_CLASS = "vm"
NAME_MAX = 64  # HOST_NAME_MAX

# One registration (at most five calls) may take this long; machined answers in about a
# millisecond, so only a wedged machined reaches it, and a start waits no longer than this.
REGISTER_TIMEOUT = 5.0
# After a registration timed out, machined is left alone this long: hundreds of VMs reattached
# at a daemon's start-up must not each wait REGISTER_TIMEOUT for a wedged machined (start-up
# would outlast the unit's start timeout). VMs started meanwhile run unregistered.
UNANSWERED_PAUSE = 60.0
# VM names whose problem was said: bounded, since transient VMs may come and go for ever.
REPORTED_MAX = 1024

# The bus's answers when machined is not there and cannot be activated (not installed:
# systemd-container is missing; masked; its unit failed).
_UNAVAILABLE_PREFIXES = (
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
    "org.freedesktop.DBus.Error.Spawn.",
    "org.freedesktop.systemd1.",
)
_NO_MACHINE_FOR_PID = "org.freedesktop.machine1.NoMachineForPID"
_MACHINE_EXISTS = "org.freedesktop.machine1.MachineExists"


def name_problem(name: str) -> str | None:
    """Why machined (systemd 252's hostname_is_valid) refuses NAME, said about the name; None
    if it takes it."""
    if not name:
        return "is empty"
    if len(name) > NAME_MAX:
        return f"is longer than {NAME_MAX} characters"
    if "_" in name:
        return "contains '_', which machine names (host-name rules) do not allow"
    if any(not (char.isascii() and (char.isalnum() or char in "-.")) for char in name):
        return "contains a character other than letters, digits, '-' and '.'"
    for label in name.split("."):
        if not label:
            return "has an empty part between dots (or begins or ends with '.')"
        if label.startswith("-") or label.endswith("-"):
            return "has a part between dots that begins or ends with '-'"
    return None


class Unavailable(Exception):
    """machined is not on this host (or cannot be started)."""


class NotRegistered(Exception):
    """machined will not register this VM; the message says why, for a person."""


class Machined:
    """Registers VMs with machined over the daemon's systemd connection; never raises."""

    def __init__(self, systemd: Systemd) -> None:
        self._systemd = systemd
        self._reported: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._unavailable_said = False
        self._paused_until = 0.0  # loop time until which machined is not asked (it hung)

    async def register(self, name: str, unit: str, leader: int) -> bool:
        """Make machined list VM NAME (QEMU = LEADER, running in scope UNIT); True if it is.

        Already registered (a daemon restart, a reattach): nothing is called but the lookup.
        Otherwise the VM runs on unregistered and the reason is logged once.
        """
        problem = name_problem(name)
        if problem is not None:
            self._say_once(name, f"its name {problem}")
            return False
        now = asyncio.get_running_loop().time()
        if now < self._paused_until:
            self._say_once(name, "systemd-machined did not answer a moment ago")
            return False
        try:
            async with asyncio.timeout(REGISTER_TIMEOUT):
                await self._register(name, unit, leader)
        except TimeoutError:
            self._paused_until = asyncio.get_running_loop().time() + UNANSWERED_PAUSE
            self._say_once(
                name,
                f"systemd-machined did not answer within {REGISTER_TIMEOUT:g} s (VMs started "
                f"in the next {UNANSWERED_PAUSE:g} s are not registered either)",
            )
            return False
        except Unavailable as err:
            if not self._unavailable_said:
                self._unavailable_said = True
                log.warning(
                    "VMs are not registered with systemd-machined: it is not available on this "
                    "host (%s); install systemd-container to list VMs with machinectl",
                    err,
                )
            return False
        except NotRegistered as err:
            self._say_once(name, str(err))
            return False
        except Exception:  # a bug here must never fail a start or a reattach
            log.exception("VM %s: registering it with systemd-machined failed", name)
            return False
        self._reported.pop(name, None)  # a later problem is worth saying again
        return True

    def _say_once(self, name: str, problem: str) -> None:
        if self._reported.get(name) == problem:
            return
        self._reported[name] = problem
        self._reported.move_to_end(name)
        while len(self._reported) > REPORTED_MAX:
            self._reported.popitem(last=False)
        log.warning("VM %s is not registered with systemd-machined: %s", name, problem)

    async def _register(self, name: str, unit: str, leader: int) -> None:
        known = await self._machine_of(leader)
        if known is not None:
            known_name, known_leader = known
            if known_name != name:
                raise NotRegistered(
                    f"machined already knows its QEMU (pid {leader}) as machine {known_name!r}"
                )
            if known_leader == leader:
                return  # registered by an earlier daemon: machined kept it
            await self._unregister(name)  # an earlier run's, never dropped: replace it
        try:
            await self._register_call(name, leader)
        except NotRegistered:
            if not await self._stale_registration(name, unit, leader):
                raise
            await self._unregister(name)
            await self._register_call(name, leader)

    async def _register_call(self, name: str, leader: int) -> None:
        try:
            await self._manager(
                "RegisterMachine",
                "sayssus",
                name,
                machine_uuid(name).bytes,
                SERVICE,
                MACHINE_CLASS,
                leader,
                "",
            )
        except SdBusBaseError as exc:
            if error_name(exc) == _MACHINE_EXISTS:
                raise NotRegistered(f"machined already has a machine named {name!r}") from exc
            raise NotRegistered(f"machined refused it: {_message(exc)}") from exc
        log.info("VM %s registered with systemd-machined (leader %d)", name, leader)

    async def _machine_of(self, pid: int) -> tuple[str, int] | None:
        """(name, leader) of the machine machined has for PID, or None."""
        try:
            path = await self._manager("GetMachineByPID", "u", pid)
        except SdBusBaseError as exc:
            if error_name(exc) == _NO_MACHINE_FOR_PID:
                return None
            raise NotRegistered(f"cannot ask machined about pid {pid}: {_message(exc)}") from exc
        name = await self._property(str(path), "Name")
        leader = await self._property(str(path), "Leader")
        return str(name), int(leader)

    async def _stale_registration(self, name: str, unit: str, leader: int) -> bool:
        """Whether machine NAME is ours from an earlier run (same scope, another leader)."""
        try:
            path = str(await self._manager("GetMachine", "s", name))
            service = await self._property(path, "Service")
            known_unit = await self._property(path, "Unit")
            known_leader = await self._property(path, "Leader")
        except (SdBusBaseError, NotRegistered):
            return False
        return service == SERVICE and known_unit == unit and int(known_leader) != leader

    async def _unregister(self, name: str) -> None:
        try:
            await self._manager("UnregisterMachine", "s", name)
        except SdBusBaseError as exc:
            raise NotRegistered(
                f"cannot replace an earlier registration of it: {_message(exc)}"
            ) from exc
        log.info("VM %s: an earlier run's registration with systemd-machined removed", name)

    async def _property(self, path: str, prop: str) -> Any:
        try:
            value = await self._call(path, _PROPERTIES_IFACE, "Get", "ss", _MACHINE_IFACE, prop)
        except SdBusBaseError as exc:
            raise NotRegistered(f"cannot read machined's {prop}: {_message(exc)}") from exc
        return value[1] if isinstance(value, tuple) and len(value) == 2 else value

    async def _manager(self, method: str, signature: str, *args: Any) -> Any:
        return await self._call(_MANAGER_PATH, _MANAGER_IFACE, method, signature, *args)

    async def _call(
        self, path: str, interface: str, method: str, signature: str, *args: Any
    ) -> Any:
        try:
            return await self._systemd.call_service(
                MACHINED, path, interface, method, signature, *args
            )
        except SdBusBaseError as exc:
            if error_name(exc).startswith(_UNAVAILABLE_PREFIXES):
                raise Unavailable(_message(exc)) from exc
            raise


def _message(exc: SdBusBaseError) -> str:
    """The error's own message (sdbus: args (name, message) for unmapped errors)."""
    args = exc.args
    if len(args) >= 2 and isinstance(args[1], str) and args[1]:
        return args[1]
    return str(args[0]) if args else type(exc).__name__
