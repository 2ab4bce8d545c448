"""Every overlap mode gives exactly the tokens of `none` (CPU, gloo TP=2, where the modes run the
same code paths in program order); a mode that cannot apply says why; no streams leak."""
import os

import pytest

from llm_bench.engine import ModeNotApplicable, random_prompts
from overlap.config import ConfigError, EngineConfig
from overlap.engine import TPEngine
from overlap.streams import MODES, Schedule, StreamManager
from tests.helpers import proc_stat

BATCHES = (1, 2, 7, 16)


@pytest.fixture(scope="module")
def reference(engine_factory):
    eng = engine_factory(tp=2, overlap="none", batch_sizes=BATCHES, max_seq=24)
    out = {b: eng.generate(random_prompts(b, 10, 512, b), 12).tokens for b in BATCHES}
    eng.close()
    return out


@pytest.mark.parametrize("mode", [m for m in MODES if m != "none"])
def test_mode_gives_the_tokens_of_none(engine_factory, reference, mode):
    eng = engine_factory(tp=2, overlap=mode, batch_sizes=BATCHES, max_seq=24)
    for b in BATCHES:
        g = eng.generate(random_prompts(b, 10, 512, b), 12)
        assert g.tokens == reference[b], f"{mode} batch {b}"
    assert eng.describe()["streams_created"] == 0  # CPU: no streams at all
    eng.close()


def test_full_at_batch_1_says_what_it_applies(engine_factory):
    eng = engine_factory(tp=2, overlap="full", batch_sizes=(1,), max_seq=16)
    assert eng.generate([[1, 2, 3]], 4).info["overlap_applied"] == "double_buffer,pipeline-prefill,prefetch"
    eng = engine_factory(tp=2, overlap="full", batch_sizes=(4,), max_seq=16, pipeline_min_batch=8,
                         pipeline_min_tokens=13)
    assert eng.generate([[1, 2, 3]] * 4, 4).info["overlap_applied"] == "double_buffer,prefetch"  # 12 tokens
    assert eng.generate([[1, 2, 3, 4]] * 4, 4).info["overlap_applied"] == "double_buffer,pipeline-prefill,prefetch"


def test_pipeline_where_it_does_not_pay_is_refused_with_the_thresholds(engine_factory):
    eng = engine_factory(tp=2, overlap="pipeline", batch_sizes=(4,), max_seq=16, pipeline_min_batch=8,
                         pipeline_min_tokens=100)
    with pytest.raises(ModeNotApplicable, match="--llm-pipeline-min-batch"):
        eng.generate([[1, 2, 3]] * 4, 4)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="unknown overlap mode"):
        StreamManager.__init__(object.__new__(StreamManager), device=__import__("torch").device("cpu"),
                               mode="turbo")
    with pytest.raises(ValueError, match="unknown overlap mode"):
        Schedule("turbo")


def test_batch_larger_than_engine_is_refused(engine_factory):
    eng = engine_factory(tp=1, batch_sizes=(2,), max_seq=16)
    with pytest.raises(ConfigError, match="larger than the engine's largest batch 2"):
        eng.generate([[1]] * 3, 2)


def _children() -> set[int]:
    me = str(os.getpid())
    stats = {int(d): proc_stat(d) for d in os.listdir("/proc") if d.isdigit()}
    return {pid for pid, st in stats.items() if st is not None and st[1] == me and st[0] != "Z"}


def test_repeated_builds_of_every_mode_leak_nothing():
    """Build and close an engine of every mode twice: afterwards this process has the child processes
    and open file descriptors it had before (the ranks, their sockets and logs are gone), and every
    build reports the same stream count (0 on CPU; on GPUs tests/test_gpu.py counts them per mode)."""
    before_kids, before_fds = _children(), len(os.listdir("/proc/self/fd"))
    streams = {}
    for _ in range(2):
        for mode in MODES:
            with TPEngine(EngineConfig(model="tiny", tp=2, overlap=mode, batch_sizes=(2,), max_seq=12,
                                       engine_timeout=120)) as eng:
                assert len(eng.generate([[1, 2], [3, 4]], 4).tokens) == 2
                streams.setdefault(mode, set()).add(eng.describe()["streams_created"])
            assert _children() == before_kids, f"{mode}: rank processes left behind"
            assert len(os.listdir("/proc/self/fd")) == before_fds, f"{mode}: file descriptors leaked"
    assert all(counts == {0} for counts in streams.values()), streams
