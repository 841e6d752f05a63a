"""The autostart order: levels, cycles, unknown names, failures and the delay (no systemd)."""

from __future__ import annotations

import asyncio
import random

import pytest

from supervisord_vm import autostart_order
from supervisord_vm.autostart_order import (
    check_definition,
    cycles,
    definition_problems,
    graph_problems,
    levels,
    named_by,
    plan,
)
from supervisord_vm.errors import InvalidDefinition


def test_levels_follow_the_names() -> None:
    graph = {"db": [], "cache": [], "app": ["db", "cache"], "web": ["app"], "dns": []}
    assert levels(plan(graph, graph)) == [["cache", "db", "dns"], ["app"], ["web"]]


def test_only_vms_starting_now_are_waited_for() -> None:
    graph = {"db": [], "app": ["db"], "web": ["app", "db"]}
    # db is already running (reattached) or does not autostart: nobody waits for it.
    order = plan(graph, ["app", "web"])
    assert order.waits == {"app": frozenset(), "web": frozenset({"app"})}


def test_waiting_is_not_transitive_through_a_vm_not_started() -> None:
    """As with systemd's After=: a VM not in this run orders nothing."""
    graph = {"a": [], "b": ["a"], "c": ["b"]}
    assert plan(graph, ["a", "c"]).waits == {"a": frozenset(), "c": frozenset()}


def test_cycles_are_found_with_every_member() -> None:
    graph = {"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"], "e": ["e"], "f": ["g"], "g": []}
    assert cycles(graph) == [["a", "b", "c"], ["e"]]


def test_a_cycle_autostarts_together_after_what_it_names_outside() -> None:
    graph = {"db": [], "a": ["b", "db"], "b": ["a"], "web": ["a"]}
    order = plan(graph, graph)
    assert order.waits["a"] == {"db"}
    assert order.waits["b"] == frozenset()
    assert levels(order) == [["b", "db"], ["a"], ["web"]]


def test_unknown_names_are_ignored_at_autostart_and_reported() -> None:
    graph = {"web": ["db", "ghost"], "db": []}
    assert plan(graph, graph).waits == {"db": frozenset(), "web": frozenset({"db"})}
    assert graph_problems(graph) == [
        "VM web autostarts after 'ghost', which is not a defined VM: the name is ignored"
    ]


def test_graph_problems_name_a_cycle() -> None:
    problems = graph_problems({"a": ["b"], "b": ["a"]})
    assert len(problems) == 1
    assert "VMs a, b name each other in autostart_after (a cycle)" in problems[0]


def test_define_refuses_an_unknown_name() -> None:
    with pytest.raises(InvalidDefinition, match="names 'db', which is not a defined VM"):
        check_definition("web", ["db"], {"app": []}, "definition")


def test_define_refuses_a_cycle_and_shows_it() -> None:
    others = {"db": ["app"], "app": ["web"]}
    assert definition_problems("web", ["db"], others) == [
        "field 'autostart_after': web -> db -> app -> web would be a cycle"
    ]
    assert definition_problems("web", ["web"], {}) == [
        "field 'autostart_after': web -> web would be a cycle"
    ]


def test_define_accepts_a_redefinition_that_keeps_the_graph_acyclic() -> None:
    others = {"db": [], "app": ["db"]}
    assert definition_problems("web", ["app", "db"], others) == []
    # "web" itself already in `others` with other names: its new names replace them
    assert definition_problems("db", [], {"app": ["db"], "db": ["app"]}) == []


def test_named_by_lists_dependents() -> None:
    assert named_by("db", {"db": [], "web": ["db"], "app": ["db", "x"], "x": []}) == [
        "app",
        "web",
    ]


def test_large_graphs_do_not_recurse() -> None:
    chain = {f"vm{i}": [f"vm{i - 1}"] if i else [] for i in range(5000)}
    assert cycles(chain) == []
    assert len(levels(plan(chain, chain))) == 5000
    ring = {f"vm{i}": [f"vm{(i + 1) % 5000}"] for i in range(5000)}
    assert len(cycles(ring)[0]) == 5000


def test_every_random_graph_gives_an_acyclic_plan_with_every_vm() -> None:
    rng = random.Random(11)
    for _ in range(200):
        names = [f"v{i}" for i in range(rng.randrange(1, 12))]
        graph = {n: rng.sample([*names, "ghost"], rng.randrange(0, 3)) for n in names}
        starting = [n for n in names if rng.random() < 0.8]
        rounds = levels(plan(graph, starting))
        assert sorted(n for level in rounds for n in level) == sorted(starting)
        position = {n: i for i, level in enumerate(rounds) for n in level}
        for name, deps in plan(graph, starting).waits.items():
            assert all(position[dep] < position[name] for dep in deps)


# --- the runner -------------------------------------------------------------------------------


class Recorder:
    """Fake starts and sleeps that log what happened, in order."""

    def __init__(self, failing: frozenset[str] = frozenset()) -> None:
        self.log: list[str] = []
        self.failing = failing
        self.running = 0
        self.most_running = 0

    async def start(self, name: str) -> bool:
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        self.log.append(f"start {name}")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        self.running -= 1
        if name in self.failing:
            self.log.append(f"failed {name}")
            return False
        self.log.append(f"started {name}")
        return True

    async def sleep(self, seconds: float) -> None:
        self.log.append(f"sleep {seconds:g}")
        await asyncio.sleep(0)
        self.log.append(f"slept {seconds:g}")


def run(graph: dict[str, list[str]], recorder: Recorder, delays: dict[str, float]) -> None:
    asyncio.run(
        autostart_order.run(
            plan(graph, graph),
            recorder.start,
            lambda name: delays.get(name, 0),
            limit=16,
            sleep=recorder.sleep,
        )
    )


def test_dependents_start_after_the_vm_they_name_has_started() -> None:
    recorder = Recorder()
    run({"db": [], "app": ["db"], "web": ["app"]}, recorder, {})
    assert recorder.log == [
        "start db",
        "started db",
        "start app",
        "started app",
        "start web",
        "started web",
    ]


def test_independent_vms_start_concurrently_within_the_limit() -> None:
    recorder = Recorder()
    graph: dict[str, list[str]] = {f"vm{i}": [] for i in range(40)}
    asyncio.run(autostart_order.run(plan(graph, graph), recorder.start, lambda _n: 0, limit=16))
    assert recorder.most_running == 16
    assert recorder.log.count("start vm0") == 1


def test_delay_is_waited_after_the_start_before_dependents() -> None:
    recorder = Recorder()
    run({"db": [], "web": ["db"], "solo": []}, recorder, {"db": 30, "solo": 99})
    log = recorder.log
    assert log.index("started db") < log.index("sleep 30") < log.index("slept 30")
    assert log.index("slept 30") < log.index("start web")
    assert "sleep 99" not in log  # nobody waits for solo: its delay holds nothing up


def test_a_failed_dependency_does_not_keep_dependents_off_and_skips_its_delay(
    caplog: pytest.LogCaptureFixture,
) -> None:
    recorder = Recorder(failing=frozenset({"db"}))
    run({"db": [], "web": ["db"]}, recorder, {"db": 30})
    assert recorder.log == ["start db", "failed db", "start web", "started web"]
    assert "autostarting VM web although db, which it autostarts after, did not start" in (
        caplog.text
    )


def test_a_start_that_raises_counts_as_failed_and_the_rest_go_on() -> None:
    async def start(name: str) -> bool:
        if name == "db":
            raise RuntimeError("boom")
        return True

    graph = {"db": [], "web": ["db"]}
    started = asyncio.run(autostart_order.run(plan(graph, graph), start, lambda _n: 0, limit=2))
    assert started == {"db": False, "web": True}
