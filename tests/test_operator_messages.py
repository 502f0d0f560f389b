"""The operator-facing messages, without a server: the replication check of ``chatd store migrate``,
driver errors as one line, and start-up errors unwrapped from trio's ExceptionGroups.
(tests/test_cassandra_ops.py runs the same paths as real processes against a real Cassandra.)"""

from __future__ import annotations

import pytest
import trio
from cassandra import InvalidRequest, Unavailable
from cassandra.cluster import NoHostAvailable

from chatd.cli import operator_error
from chatd.store.cassandra_schema import parse_replication, replication_shortfall
from chatd.store.cql import error_text

NTS = "'class': 'NetworkTopologyStrategy'"


def test_parse_replication():
    assert parse_replication("{'class': 'SimpleStrategy', 'replication_factor': 3}") == {
        "class": "SimpleStrategy", "replication_factor": "3"}
    assert parse_replication(f" {{{NTS}, 'dc1': '3/1', \"dc2\": 2}} ")["dc1"] == "3/1"
    for bad in ("SimpleStrategy", "{}", "{'class': }", "{'class': ['x']}", "{1: 2}", "{'dc1': true}"):
        with pytest.raises(ValueError, match=r"^cassandra.replication must be a CQL map like"):
            parse_replication(bad)


@pytest.mark.parametrize("replication, live, problem", [
    # the default (replication_factor 3 in every data center) on a one-node cluster: the trap
    (f"{{{NTS}, 'replication_factor': 3}}", {"dc1": 1},
     "asks for 3 replicas in data center 'dc1', which has 1 live node (the driver sees 'dc1': 1 live): "
     "lower the replication factor in cassandra.replication to at most 1 or start more nodes"),
    (f"{{{NTS}, 'replication_factor': 3}}", {"dc1": 3, "dc2": 2}, "in data center 'dc2', which has 2 live nodes"),
    (f"{{{NTS}, 'replication_factor': 3, 'dc2': 1}}", {"dc1": 3, "dc2": 2}, None),  # named DCs win
    (f"{{{NTS}, 'dc1': 3}}", {"dc1": 3, "dc2": 0}, None),
    (f"{{{NTS}, 'dc1': '3/1'}}", {"dc1": 2}, "asks for 3 replicas in data center 'dc1'"),
    (f"{{{NTS}, 'DC1': 1}}", {"dc1": 3}, "names data center 'DC1', which this cluster does not have "
                                          "(the driver sees 'dc1': 3 live)"),
    ("{'class': 'org.apache.cassandra.locator.SimpleStrategy', 'replication_factor': 2}", {"a": 1},
     "asks for 2 replicas in the cluster, which has 1 live node"),
    ("{'class': 'SimpleStrategy', 'replication_factor': 2}", {"a": 1, "b": 1}, None),
    ("{'class': 'com.example.CustomStrategy', 'replication_factor': 9}", {"a": 1}, None),
])
def test_replication_shortfall(replication, live, problem):
    found = replication_shortfall(replication, live)
    if problem is None:
        assert found is None
    else:
        assert found.startswith("cassandra.") and problem in found, found


def test_driver_errors_in_one_line():
    unavailable = Unavailable('Error from server: code=1000 [Unavailable exception] message="Cannot achieve '
                              'consistency level LOCAL_QUORUM" info={...}', consistency=6, required_replicas=2,
                              alive_replicas=1)
    assert error_text(unavailable) == "Cannot achieve consistency level LOCAL_QUORUM (2 replicas required, 1 alive)"
    assert error_text(NoHostAvailable("Unable to connect to any servers", {
        "10.0.0.1:9042": ConnectionRefusedError(111, "Connection refused"),
        "10.0.0.2:9042": OSError("multi\nline")})) == ("Unable to connect to any servers: [Errno 111] Connection "
                                                       "refused; multi line")
    assert error_text(InvalidRequest('Error from server: code=2200 [Invalid query] message="Column with name '
                                     "'c' already exists\"")) == "Column with name 'c' already exists"


def test_operator_error_unwraps_trios_exception_groups():
    """``chatd run``/``shard``/``api``: what a nursery raised reaches the operator as its one line."""
    older = RuntimeError("Cassandra keyspace 'k' has schema v1, this chatd needs v2; run `chatd store migrate`")

    async def fail_in_a_nursery():
        async with trio.open_nursery() as nursery:
            async def task():
                raise older
            nursery.start_soon(task)
    with pytest.raises(BaseExceptionGroup) as caught:
        trio.run(fail_in_a_nursery)
    assert operator_error(caught.value) == str(older)
    nested = ExceptionGroup("outer", [ExceptionGroup("inner", [older]), RuntimeError("second\nline")])
    assert operator_error(nested) == f"{older}; second line"
    assert operator_error(ValueError("bad")) == "bad"
    # a bug keeps its traceback: not an operator error, alone or among them
    assert operator_error(ExceptionGroup("g", [older, KeyError("x")])) is None
    assert operator_error(TypeError("x")) is None
    assert operator_error(RuntimeError("")) is None
