"""The order of a boot's autostart: each VM's `autostart_after` as a dependency graph (pure,
apart from the runner, which only awaits what it is given).

The semantics are systemd's `After=` and Proxmox's `startup: order=,up=`:
- ordering only: a VM waits until every VM it names that is autostarted in the same run has
  started (is running), then `autostart_delay` seconds of each. A named VM that is not being
  autostarted (autostart off, or already running) is not waited for and is not pulled in;
- a named VM that fails to start does not keep its dependents shut off: they start anyway, with
  a warning (an `After=` unit starts when its predecessor failed; Proxmox goes on with the next
  VM). The delay is waited only after a successful start;
- VMs with nothing between them start concurrently, at most `limit` starts at a time.

Definitions are checked when they are made (Define, Create): a name that is not a VM, or one
that closes a cycle, is refused. Files edited by hand can still hold either; then the problem
is reported (start-up, reload) and autostart goes on: an unknown name is ignored, and the VMs of
a cycle autostart together, each once the VMs outside the cycle that it names have started.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from supervisord_vm.errors import InvalidDefinition, InvalidState

log = logging.getLogger(__name__)

Graph = Mapping[str, Sequence[str]]  # VM name -> the VMs it autostarts after


class NamedByOthers(InvalidState):
    """A VM other definitions autostart after cannot be undefined: their order would break."""


def cycles(graph: Graph) -> list[list[str]]:
    """Every set of VMs that name each other, directly or through others (a strongly connected
    component of more than one VM, or a VM naming itself), each sorted, sorted by first name.

    Iterative Tarjan: thousands of definitions must not meet Python's recursion limit.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, int]] = [(root, 0)]
        while work:
            node, position = work.pop()
            if position == 0:
                index[node] = low[node] = len(index)
                stack.append(node)
                on_stack.add(node)
            successors = [n for n in graph.get(node, ()) if n in graph]
            if position < len(successors):
                work.append((node, position + 1))
                successor = successors[position]
                if successor not in index:
                    work.append((successor, 0))
                elif successor in on_stack:
                    low[node] = min(low[node], index[successor])
                continue
            if work:  # return to the caller: carry the lowest index found
                caller = work[-1][0]
                low[caller] = min(low[caller], low[node])
            if low[node] == index[node]:
                component: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph.get(node, ()):
                    found.append(sorted(component))
    return sorted(found)


def _path(graph: Graph, start: str, goal: str) -> list[str]:
    """A shortest chain of autostart_after names from `start` to `goal` ([] if none)."""
    previous: dict[str, str] = {}
    queue = [start]
    seen = {start}
    for node in queue:
        if node == goal:
            chain = [node]
            while chain[-1] != start:
                chain.append(previous[chain[-1]])
            return chain[::-1]
        for successor in graph.get(node, ()):
            if successor not in seen:
                seen.add(successor)
                previous[successor] = node
                queue.append(successor)
    return []


def definition_problems(name: str, after: Sequence[str], others: Graph) -> list[str]:
    """Why VM `name`, autostarting after `after`, cannot join the VMs `others` (every other
    VM's autostart_after): names that are no VM, and the cycle it would close."""
    problems = [
        f"field 'autostart_after': names {dep!r}, which is not a defined VM"
        for dep in after
        if dep not in others and dep != name
    ]
    graph: dict[str, Sequence[str]] = {**others, name: after}
    for dep in after:
        chain = [name] if dep == name else _path(graph, dep, name)
        if chain:
            shown = " -> ".join([name, *chain])
            problems.append(f"field 'autostart_after': {shown} would be a cycle")
            break
    return problems


def check_definition(name: str, after: Sequence[str], others: Graph, source: str) -> None:
    """InvalidDefinition unless VM `name` can autostart after `after` among `others`."""
    problems = definition_problems(name, after, others)
    if problems:
        raise InvalidDefinition(f"{source}: " + "; ".join(problems))


def named_by(name: str, graph: Graph) -> list[str]:
    """The VMs (other than `name`) whose autostart_after names `name`, sorted."""
    return sorted(other for other, after in graph.items() if other != name and name in after)


def graph_problems(graph: Graph) -> list[str]:
    """What a set of definitions (hand-edited files) holds that Define would have refused,
    and what autostart does about it, one sentence each."""
    problems = [
        f"VM {name} autostarts after {dep!r}, which is not a defined VM: the name is ignored"
        for name in sorted(graph)
        for dep in graph[name]
        if dep not in graph
    ]
    problems += [
        f"VMs {', '.join(cycle)} name each other in autostart_after (a cycle): they autostart "
        f"together, each once the VMs outside the cycle that it names have started"
        if len(cycle) > 1
        else f"VM {cycle[0]} names itself in autostart_after: that name is ignored"
        for cycle in cycles(graph)
    ]
    return problems


@dataclass(frozen=True)
class Plan:
    """One autostart run: for each VM to start, the VMs it waits for (acyclic)."""

    waits: Mapping[str, frozenset[str]]


def plan(graph: Graph, starting: Iterable[str]) -> Plan:
    """The waits of the VMs `starting` from their autostart_after in `graph` (all definitions).

    Kept: names of VMs also starting now. Dropped: names of VMs not starting now (running or
    not autostarted), of no VM, and of VMs in the same cycle (so the plan has no cycle).
    """
    chosen = set(starting)
    component = {member: i for i, cycle in enumerate(cycles(graph)) for member in cycle}
    waits: dict[str, frozenset[str]] = {}
    for name in sorted(chosen):
        mine = component.get(name)
        waits[name] = frozenset(
            dep
            for dep in graph.get(name, ())
            if dep in chosen and dep != name and (mine is None or component.get(dep) != mine)
        )
    return Plan(waits)


def levels(order: Plan) -> list[list[str]]:
    """The plan in rounds: each VM in the first round after all it waits for (for logs and
    tests; the runner does not wait for a whole round). Linear in VMs and names."""
    waiting = {name: len(deps) for name, deps in order.waits.items()}
    dependents: dict[str, list[str]] = {}
    for name, deps in order.waits.items():
        for dep in deps:
            dependents.setdefault(dep, []).append(name)
    ready = sorted(name for name, count in waiting.items() if count == 0)
    rounds: list[list[str]] = []
    while ready:
        rounds.append(ready)
        following: list[str] = []
        for name in ready:
            for dependent in dependents.get(name, ()):
                waiting[dependent] -= 1
                if waiting[dependent] == 0:
                    following.append(dependent)
        ready = sorted(following)
    return rounds


async def run(
    order: Plan,
    start: Callable[[str], Awaitable[bool]],
    delay_of: Callable[[str], float],
    *,
    limit: int,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> dict[str, bool]:
    """Start every VM of the plan, each once the VMs it waits for are done; return who started.

    `start(name)` returns whether the VM is running (it logs its own failure). After a
    successful start with dependents, `delay_of(name)` seconds pass before they may start.
    """
    done = {name: asyncio.Event() for name in order.waits}
    waited_for = {dep for deps in order.waits.values() for dep in deps}
    started: dict[str, bool] = {}
    slots = asyncio.Semaphore(limit)

    async def one(name: str) -> None:
        try:
            for dep in sorted(order.waits[name]):
                await done[dep].wait()
            failed = sorted(dep for dep in order.waits[name] if not started.get(dep))
            if failed:
                log.warning(
                    "autostarting VM %s although %s, which it autostarts after, did not start",
                    name,
                    ", ".join(failed),
                )
            async with slots:
                try:
                    started[name] = await start(name)
                except Exception:
                    log.exception("autostart of VM %s failed", name)
                    started[name] = False
            delay = delay_of(name)
            if started[name] and delay > 0 and name in waited_for:
                log.info("VM %s started; its dependents start in %g s", name, delay)
                await sleep(delay)
        finally:
            started.setdefault(name, False)
            done[name].set()

    await asyncio.gather(*(one(name) for name in order.waits))
    return started
