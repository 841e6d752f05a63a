"""The host side of a VM's network cards: taps made for bridge NICs (put on the bridge, removed
after the exit), administrators' taps opened, and QEMU's arguments for every NIC.

QEMU never opens a tap itself: the daemon (root, CAP_NET_ADMIN) opens each one and hands QEMU
the descriptor (`-netdev tap,fd=N`), so a QEMU without privileges, under its seccomp filter,
can use it. A tap the daemon makes carries an alias naming the VM and the NIC: a cleanup (this
daemon's, or the next one's after a restart) removes its own taps and never an interface that
someone else made under the same name.

Netlink goes through pyroute2, imported on first use: it takes about 0.4 s to import, and a
host whose VMs have no bridge or tap NIC never needs it. Every netlink call is blocking and runs
in a worker thread, bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import fcntl
import functools
import hashlib
import logging
import os
import re
import socket
import struct
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from supervisord_vm import boot, confinement
from supervisord_vm.confinement import QemuIdentity
from supervisord_vm.definition import Definition
from supervisord_vm.definition_devices import Nic, nic_mac
from supervisord_vm.errors import SvmError

log = logging.getLogger(__name__)

_T = TypeVar("_T")

TUN_DEVICE = "/dev/net/tun"
IFNAME_MAX = 15  # IFNAMSIZ without the NUL
NETLINK_TIMEOUT = 15.0  # seconds; netlink answers in milliseconds unless the RTNL lock is stuck

# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOWNER = 0x400454CC
TUNSETGROUP = 0x400454CE
TUNGETIFF = 0x800454D2
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_TUN_EXCL = 0x8000
IFF_PERSIST = 0x0800
_IFREQ = struct.Struct("16sH22x")  # struct ifreq: name, then ifr_flags in the 24-byte union

_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.-]+")


class NetworkError(Exception):
    """A NIC cannot be set up on the host; the message says why, for a person."""


# --- names and QEMU's arguments (pure) -----------------------------------------------------------


def tap_name(vm_name: str, index: int) -> str:
    """The tap the daemon makes for NIC `index` of VM `vm_name`: `svm-NAME-INDEX` when that fits
    in an interface name, else `svm` + a hash of the name + `-INDEX`.

    Two VMs never get the same name from this: a plain name starts with `svm-` and a hashed one
    never does (base32 has no '-'); within each form the index follows the last '-'. The hashed
    form keeps 45 bits or more of SHA-256; the alias check in `open_nics` refuses to take over an
    interface that is not this VM's, should two long names ever collide.
    """
    plain = f"svm-{vm_name}-{index}"
    if len(plain.encode()) <= IFNAME_MAX and _PLAIN_NAME.fullmatch(vm_name):
        return plain
    suffix = f"-{index}"
    return "svm" + _name_digest(vm_name)[: IFNAME_MAX - 3 - len(suffix)] + suffix


@functools.lru_cache(maxsize=1024)
def _name_digest(vm_name: str) -> str:
    """Base32 of the name's SHA-256 (cached: a cleanup compares it with every interface)."""
    return base64.b32encode(hashlib.sha256(vm_name.encode()).digest()).decode().lower()


def tap_alias(vm_name: str, index: int) -> str:
    """The alias that marks a tap as made by supervisord-vm for this VM's NIC (`ip link` shows
    it); only root can set an alias, so it cannot be forged by a user."""
    return f"supervisord-vm VM {vm_name} NIC {index}"


def _is_tap_of(vm_name: str, ifname: str) -> bool:
    """Whether `ifname` is a name `tap_name` gives one of this VM's NICs."""
    _, sep, digits = ifname.rpartition("-")
    if not sep or not digits.isascii() or not digits.isdigit() or len(digits) > 3:
        return False
    return tap_name(vm_name, int(digits)) == ifname


def uses_vnet_hdr(nic: Nic) -> bool:
    """virtio-net takes the virtio header on the tap (checksum and segmentation offload), as
    libvirt sets it up; emulated cards get plain frames."""
    return nic.model.startswith("virtio-net")


def netdev_id(index: int) -> str:
    return f"net{index}"


def needs_host_devices(defn: Definition) -> bool:
    """Whether a start must open taps (and load pyroute2) for this definition."""
    return any(nic.type in ("bridge", "tap") for nic in defn.nics)


def makes_taps(defn: Definition) -> bool:
    """Whether a start of `defn` makes taps (which its exit cleanup must remove)."""
    return any(nic.type == "bridge" for nic in defn.nics)


def nic_argv(defn: Definition, tap_fds: Mapping[int, int]) -> list[str]:
    """`-netdev`/`-device` pairs for every NIC, in guest order (= PCI slot order).

    `tap_fds`: NIC index -> the descriptor QEMU gets for a bridge or tap NIC (`open_nics`).
    """
    argv: list[str] = []
    _, bootindex = boot.boot_indexes(defn)  # boot = [..., "network", ...]: PXE in that place
    for index, nic in enumerate(defn.nics):
        netdev = netdev_id(index)
        if nic.type == "user":
            parts = ["user", f"id={netdev}"]
            parts += [f"hostfwd={rule.replace(',', ',,')}" for rule in nic.forward]
        elif nic.type in ("bridge", "tap"):
            fd = tap_fds.get(index)
            if fd is None:
                raise ValueError(f"NIC {index} of VM {defn.name} has no open tap")
            parts = ["tap", f"id={netdev}", f"fd={fd}"]
        else:
            raise ValueError(f"NIC {index} of VM {defn.name} has an unknown type {nic.type!r}")
        mac = nic_mac(defn.name, index, nic)
        argv += ["-netdev", ",".join(parts)]
        device = f"{nic.model},netdev={netdev},mac={mac},id=nic{index}"
        if index in bootindex:
            device += f",bootindex={bootindex[index]}"
        argv += ["-device", device]
    return argv


# --- opening the taps for a start ----------------------------------------------------------------


@dataclass
class OpenedNics:
    """What a start prepared: a descriptor per bridge/tap NIC, and the taps made for it."""

    fds: dict[int, int] = field(default_factory=dict)  # NIC index -> fd handed to QEMU
    made: list[str] = field(default_factory=list)  # taps this start created

    def close_fds(self) -> None:
        """Close the daemon's copies (QEMU has its own once spawned)."""
        fds, self.fds = list(self.fds.values()), {}
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


async def open_nics(defn: Definition, timeout: float = NETLINK_TIMEOUT) -> OpenedNics:  # noqa: ASYNC109
    """Make and open the taps of `defn`'s bridge NICs and open its tap NICs' devices.

    Raises NetworkError naming the NIC and the cause; nothing is left behind then (a call that
    outlives `timeout` undoes its work when it ends).
    """
    if not needs_host_devices(defn):
        return OpenedNics()
    return await _bounded(
        lambda: _open_nics(defn),
        timeout,
        f"setting up the network devices of VM {defn.name}",
        late=lambda opened: _discard(defn.name, opened),
    )


async def discard(vm_name: str, opened: OpenedNics, timeout: float = NETLINK_TIMEOUT) -> None:  # noqa: ASYNC109
    """Undo `open_nics` for a start that did not happen: close the fds, remove the taps made."""
    opened.close_fds()
    made = list(opened.made)
    if made:
        try:
            await _bounded(lambda: _discard(vm_name, opened), timeout, "removing taps")
        except NetworkError as err:  # timed out: the thread still removes them when it can
            log.warning("VM %s: cannot remove taps %s: %s", vm_name, ", ".join(made), err)


async def remove_vm_taps(vm_name: str, timeout: float = NETLINK_TIMEOUT) -> list[str]:  # noqa: ASYNC109
    """Remove every tap the daemon made for VM `vm_name` (after its QEMU ended); never raises.

    Found by name (the names `tap_name` gives, listed with one if_nameindex call in the
    daemon's network namespace) and removed only if its alias says it is this VM's: this needs
    no definition, so it also cleans up after a run whose definition changed or was lost.
    Idempotent: a second call finds nothing.
    """
    try:
        return await _bounded(lambda: _remove_vm_taps(vm_name), timeout, "removing taps")
    except Exception as err:  # a cleanup: said, never raised
        log.warning("VM %s: cannot remove its taps: %s", vm_name, _describe(err))
        return []


async def _bounded(
    work: Callable[[], _T],
    timeout: float,  # noqa: ASYNC109
    what: str,
    late: Callable[[_T], object] | None = None,
) -> _T:
    """Run blocking `work` in a worker thread; NetworkError after `timeout` seconds.

    A thread cannot be stopped: if the caller stops waiting (timeout, cancellation), `late`
    gets the result whenever the work ends, in a worker thread, to undo it.
    """
    task = asyncio.ensure_future(asyncio.to_thread(work))
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        _undo_when_done(task, late)
        raise
    if not done:
        _undo_when_done(task, late)
        raise NetworkError(f"{what} did not finish within {timeout:g} s")
    return task.result()


def _undo_when_done(task: asyncio.Future[_T], late: Callable[[_T], object] | None) -> None:
    def done(task: asyncio.Future[_T]) -> None:
        if task.cancelled() or task.exception() is not None or late is None:
            return
        result = task.result()
        asyncio.get_running_loop().run_in_executor(None, late, result)

    task.add_done_callback(done)


def _ipr() -> Any:  # pyroute2 has no type information
    from pyroute2 import IPRoute  # noqa: PLC0415 - about 0.4 s to import: only when needed

    return IPRoute()


def _netlink_errno(err: BaseException) -> int | None:
    """The errno of a pyroute2 NetlinkError (which is no OSError), or None for anything else."""
    exceptions = sys.modules.get("pyroute2.netlink.exceptions")  # loaded with pyroute2
    if exceptions is None or not isinstance(err, exceptions.NetlinkError):
        return None
    code = getattr(err, "code", None)
    return code if isinstance(code, int) else None


def _link(ipr: Any, ifname: str) -> Any | None:
    """The interface named `ifname` in this network namespace, or None."""
    try:
        links = ipr.link("get", ifname=ifname)
    except Exception as err:
        if _netlink_errno(err) == errno.ENODEV:
            return None
        raise
    return links[0] if links else None


def _link_kind(link: Any) -> str:
    info = link.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
    return kind if isinstance(kind, str) else ""


def _tun_type(link: Any) -> int | None:
    """IFF_TUN or IFF_TAP for a tun device the kernel describes (Linux 4.15+), else None."""
    info = link.get_attr("IFLA_LINKINFO")
    data = info.get_attr("IFLA_INFO_DATA") if info is not None else None
    value = data.get_attr("IFLA_TUN_TYPE") if data is not None else None
    return value if isinstance(value, int) else None


def _open_nics(defn: Definition) -> OpenedNics:
    """Blocking `open_nics` (a worker thread)."""
    opened = OpenedNics()
    try:
        owner = confinement.qemu_identity()
        with _ipr() as ipr:
            for index, nic in enumerate(defn.nics):
                if nic.type == "bridge":
                    _make_bridge_tap(ipr, defn.name, index, nic, owner=owner, opened=opened)
                elif nic.type == "tap":
                    opened.fds[index] = _open_admin_tap(ipr, index, nic)
    except BaseException as err:
        _discard(defn.name, opened)
        if isinstance(err, NetworkError | SvmError) or not isinstance(err, Exception):
            raise
        raise NetworkError(f"cannot set up the network devices: {_describe(err)}") from err
    return opened


def _describe(err: BaseException) -> str:
    code = _netlink_errno(err)
    if code is None and isinstance(err, OSError):
        code = err.errno
    return os.strerror(code) if code else str(err)


def _make_bridge_tap(
    ipr: Any,
    vm_name: str,
    index: int,
    nic: Nic,
    *,
    owner: QemuIdentity | None,
    opened: OpenedNics,
) -> None:
    """Make NIC `index`'s tap, put it on its bridge and up; its fd goes into `opened`."""
    assert nic.bridge is not None
    bridge = _link(ipr, nic.bridge)
    if bridge is None:
        raise NetworkError(f"NIC {index}: bridge {nic.bridge} does not exist")
    kind = _link_kind(bridge)
    if kind != "bridge":
        raise NetworkError(
            f"NIC {index}: {nic.bridge} is not a bridge (it is a {kind or 'plain'} device)"
        )
    name, alias = tap_name(vm_name, index), tap_alias(vm_name, index)
    existing = _link(ipr, name)
    if existing is not None:
        if existing.get_attr("IFLA_IFALIAS") != alias:
            raise NetworkError(
                f"NIC {index}: a network interface named {name} already exists and is not "
                f"this VM's tap (remove it, or rename the VM)"
            )
        ipr.link("del", index=existing["index"])  # left by an earlier run of this VM
    fd = _tun_attach(name, IFF_TAP | IFF_NO_PI | IFF_TUN_EXCL | _vnet_flag(nic), name)
    opened.fds[index] = fd
    try:
        if owner is not None:
            fcntl.ioctl(fd, TUNSETOWNER, owner.uid)
            fcntl.ioctl(fd, TUNSETGROUP, owner.gid)
        tap = _link(ipr, name)
        if tap is None:
            raise NetworkError(f"NIC {index}: tap {name} vanished while it was set up")
        # The alias first, and only then persistence: until TUNSETPERSIST the tap lives only as
        # long as this fd, so a daemon killed here leaves no unmarked tap behind.
        # The tap's MAC is the guest's with a first octet of 0xfe (as libvirt): a bridge takes
        # the lowest MAC of its ports for its own, and no tap may ever be that.
        mac = "fe" + nic_mac(vm_name, index, nic)[2:]
        mtu = bridge.get_attr("IFLA_MTU")
        settings: dict[str, object] = {"ifalias": alias, "address": mac}
        if isinstance(mtu, int):
            settings["mtu"] = mtu  # a port with a smaller MTU would lower the bridge's
        ipr.link("set", index=tap["index"], **settings)
        fcntl.ioctl(fd, TUNSETPERSIST, 1)
        opened.made.append(name)
        ipr.link("set", index=tap["index"], master=bridge["index"], state="up")
    except OSError as err:
        raise NetworkError(
            f"NIC {index}: cannot put tap {name} on bridge {nic.bridge}: {_describe(err)}"
        ) from err
    except Exception as err:
        if _netlink_errno(err) is None:
            raise
        raise NetworkError(
            f"NIC {index}: cannot put tap {name} on bridge {nic.bridge}: {_describe(err)}"
        ) from err


def _vnet_flag(nic: Nic) -> int:
    return IFF_VNET_HDR if uses_vnet_hdr(nic) else 0


def _tun_attach(name: str, flags: int, what: str) -> int:
    """Open /dev/net/tun and attach it to tap `name` (TUNSETIFF); returns the fd."""
    fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(name.encode(), flags))
    except OSError as err:
        os.close(fd)
        raise OSError(err.errno, err.strerror, what) from err
    return fd


def _open_admin_tap(ipr: Any, index: int, nic: Nic) -> int:
    """Open the existing tap an administrator manages for NIC `index`; returns the fd."""
    assert nic.tap is not None
    link = _link(ipr, nic.tap)
    if link is None:
        raise NetworkError(f"NIC {index}: tap device {nic.tap} does not exist")
    if _link_kind(link) != "tun" or _tun_type(link) not in (None, IFF_TAP):
        raise NetworkError(f"NIC {index}: {nic.tap} is not a tap device")
    try:
        fd = _tun_attach(nic.tap, IFF_TAP | IFF_NO_PI | _vnet_flag(nic), nic.tap)
    except OSError as err:
        problems = {
            errno.EBUSY: "is in use by another program",
            errno.EINVAL: "cannot be opened as a single-queue tap (a multiqueue or tun device?)",
            errno.EPERM: "cannot be opened (permission denied)",
        }
        problem = problems.get(err.errno or 0, f"cannot be opened ({_describe(err)})")
        raise NetworkError(f"NIC {index}: tap device {nic.tap} {problem}") from err
    try:
        flags = _IFREQ.unpack(fcntl.ioctl(fd, TUNGETIFF, bytes(_IFREQ.size)))[1]
    except OSError:
        os.close(fd)
        raise
    if not flags & IFF_PERSIST:  # removed since the lookup: TUNSETIFF just made a new one
        os.close(fd)
        raise NetworkError(f"NIC {index}: tap device {nic.tap} does not exist")
    return fd


def _discard(vm_name: str, opened: OpenedNics) -> None:
    """Blocking `discard`: close the fds, remove the taps this start made (worker thread).

    Never raises: it runs while another error is on its way, or with nobody waiting. A tap it
    cannot remove is the next start's (it replaces its own) or the next exit cleanup's.
    """
    opened.close_fds()
    made, opened.made = opened.made, []
    try:
        if made:
            _remove_owned(vm_name, made)
    except Exception as err:
        log.warning("VM %s: cannot remove taps %s: %s", vm_name, ", ".join(made), _describe(err))


# --- removing the taps after an exit -------------------------------------------------------------


def _remove_vm_taps(vm_name: str) -> list[str]:
    """Blocking `remove_vm_taps` (a worker thread)."""
    names = [name for _, name in socket.if_nameindex() if _is_tap_of(vm_name, name)]
    return _remove_owned(vm_name, names) if names else []


def _remove_owned(vm_name: str, names: list[str]) -> list[str]:
    """Remove those of `names` whose alias marks them as this VM's taps; the names removed."""
    removed: list[str] = []
    with _ipr() as ipr:
        for name in names:
            link = _link(ipr, name)
            if link is None:
                continue
            index = int(name.rpartition("-")[2])
            if link.get_attr("IFLA_IFALIAS") != tap_alias(vm_name, index):
                log.warning(
                    "VM %s: leaving %s alone: supervisord-vm did not make it", vm_name, name
                )
                continue
            try:
                ipr.link("del", index=link["index"])
            except Exception as err:
                if _netlink_errno(err) != errno.ENODEV:
                    raise
                continue
            removed.append(name)
    if removed:
        log.info("VM %s: removed taps %s", vm_name, ", ".join(removed))
    return removed
