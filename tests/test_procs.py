"""EngineProcesses, the process layer under both engines: replies in order, a killed process is named
as the cause even when a peer's echo of the failure arrives first, and nothing outlives close()."""
import tempfile

import pytest

from llm_bench.engine import EngineError
from llm_bench.procs import EngineProcesses
from tests.helpers import alive


def _procs(n=2):
    return EngineProcesses("tests.procs_worker", n, {}, tempfile.mkdtemp(prefix="procs-test-"), start_timeout=60)


def test_replies_come_back_per_process_and_close_reaps():
    p = _procs()
    assert p.ready == [{"index": 0}, {"index": 1}]
    p.send(("echo", "hi"))
    assert p.collect("echo", 10) == [("ok", "hi"), ("ok", "hi")]
    pids = p.pids
    p.close()
    assert p.dead == "closed" and not any(alive(x) for x in pids)
    with pytest.raises(EngineError, match="engine is dead: closed"):
        p.send(("echo", 1))


def test_a_killed_peer_is_named_even_when_its_echo_arrives_first():
    p = _procs()
    pids = p.pids
    p.send(("peer-killed",))
    with pytest.raises(EngineError, match=r"rank 1 \(pid \d+\) died with signal SIGKILL during test "
                                          r"\(then rank 0 failed: RuntimeError: Connection reset by peer\)"):
        p.collect("test", 10)
    assert not any(alive(x) for x in pids)
