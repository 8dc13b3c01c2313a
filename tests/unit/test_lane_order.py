"""Who gets a connection lane next (:class:`aiodetach._lanes.Lanes`).

Each call below is a thread that takes a lane, records which, and keeps it
until its own event is set; a call is started only once the one before it
holds a lane or waits for one, so arrival order is the order written.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from aiodetach._lanes import Lanes, per_domain_lanes


class _Calls:
    def __init__(self, lanes: Lanes[str]) -> None:
        self.lanes = lanes
        self.got: dict[str, str] = {}  # call -> lane
        self.order: list[str] = []  # calls in the order they got a lane
        self.done: dict[str, threading.Event] = {}
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()

    def start(self, name: str, domain: str | None) -> None:
        """Start call ``name`` about ``domain``; return once it holds a lane or waits."""
        done = self.done[name] = threading.Event()
        waiting = self.lanes.waiting()

        def run() -> None:
            with self.lanes.take(domain) as lane:
                with self.lock:
                    self.got[name] = lane
                    self.order.append(name)
                done.wait()

        thread = threading.Thread(target=run, name=f"call-{name}")
        thread.start()
        self.threads.append(thread)
        _until(lambda: name in self.got or self.lanes.waiting() > waiting)

    def finish(self, name: str, then: int | None = None) -> None:
        """End call ``name``; wait until ``then`` calls in all have had a lane."""
        self.done[name].set()
        if then is not None:
            _until(lambda: len(self.order) >= then)

    def end_all(self) -> None:
        for done in self.done.values():
            done.set()
        for thread in self.threads:
            thread.join(10)


def _until(condition: Callable[[], bool]) -> None:
    for _ in range(2000):
        if condition():
            return
        time.sleep(0.005)
    raise AssertionError("the calls never got there")


@pytest.fixture
def calls() -> Iterator[_Calls]:
    made: list[_Calls] = []

    class Made(_Calls):
        def __init__(self, lanes: Lanes[str]) -> None:
            super().__init__(lanes)
            made.append(self)

    yield Made  # type: ignore[misc]
    for one in made:
        one.end_all()


def test_one_domain_gets_every_lane_but_one() -> None:
    assert [per_domain_lanes(n) for n in (1, 2, 4, 16)] == [1, 1, 3, 15]


def test_a_waiting_call_gets_the_lane_that_frees_first(calls: type[_Calls]) -> None:
    c = calls(Lanes(["lane0", "lane1", "lane2"]))
    c.start("a", "dom-a")
    c.start("b", "dom-b")
    c.start("c", "dom-c")
    c.start("waits", "dom-d")
    assert "waits" not in c.got
    c.finish("b", then=4)
    assert c.got == {"a": "lane0", "b": "lane1", "c": "lane2", "waits": "lane1"}


def test_a_domain_at_its_cap_waits_while_others_pass_it(calls: type[_Calls]) -> None:
    c = calls(Lanes(["lane0", "lane1", "lane2"]))
    c.start("s1", "stuck")
    c.start("s2", "stuck")
    c.start("s3", "stuck")  # two of three lanes: the cap
    assert "s3" not in c.got
    c.start("h1", "healthy")  # the last lane, though s3 came first
    c.start("n1", None)  # no domain: waits in line
    c.start("h2", "healthy")
    assert c.order == ["s1", "s2", "h1"]
    c.finish("h1", then=4)  # n1 came before h2
    c.finish("n1", then=5)
    assert c.order == ["s1", "s2", "h1", "n1", "h2"]
    c.finish("s1", then=6)  # the stuck domain under its cap again: s3's turn
    assert c.got["s3"] == "lane0"


def test_a_capped_call_keeps_its_place_in_line(calls: type[_Calls]) -> None:
    c = calls(Lanes(["lane0", "lane1"]))  # one lane per domain
    c.start("a1", "dom-a")
    c.start("b1", "dom-b")
    c.start("a2", "dom-a")  # capped behind a1
    c.start("n1", None)
    c.start("b2", "dom-b")  # capped behind b1
    c.finish("a1", then=3)  # a2 may run again and came before n1
    c.finish("b1", then=4)  # b2 may run again, but n1 came first
    c.finish("a2", then=5)
    assert c.order == ["a1", "b1", "a2", "n1", "b2"]


def test_calls_about_no_domain_are_not_capped(calls: type[_Calls]) -> None:
    c = calls(Lanes(["lane0", "lane1", "lane2"]))
    for name in ("n1", "n2", "n3"):
        c.start(name, None)
    assert sorted(c.got.values()) == ["lane0", "lane1", "lane2"]


def test_a_single_lane_serves_everyone_in_turn(calls: type[_Calls]) -> None:
    c = calls(Lanes(["only"]))
    c.start("a1", "dom-a")
    c.start("a2", "dom-a")
    c.start("n1", None)
    c.start("b1", "dom-b")
    for i, name in enumerate(("a1", "a2", "n1"), start=2):
        c.finish(name, then=i)
    assert c.order == ["a1", "a2", "n1", "b1"]
    assert set(c.got.values()) == {"only"}


def test_no_lanes_is_refused() -> None:
    with pytest.raises(ValueError, match="lane"):
        Lanes([])
