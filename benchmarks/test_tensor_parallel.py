"""Tensor-parallel scaling: one benchmark per TP size and batch (ids tp{N}-bs{B} stay stable across
commits), scaling efficiency against the smallest TP of the run, communication share with
--profile-communication; and the collectives themselves (NCCL-tests conventions)."""
import pytest

from fixtures.device_clock import DeviceClock

pytestmark = pytest.mark.tensor_parallel

ALLREDUCE_CLOCK = DeviceClock("allreduce_device_time")
BUSBW_CLOCK = DeviceClock("busbw_device_time")
BUSBW_BYTES = 256 << 20


def test_tensor_parallel(benchmark, llm_bench, tp, batch):
    from fixtures.measure import run_generation

    run_generation(benchmark, llm_bench, llm_bench.key(tp), batch, "tensor_parallel")


@pytest.mark.benchmark(timer=ALLREDUCE_CLOCK)
def test_allreduce_latency(benchmark, llm_bench, tp, batch):
    """All-reduce at the decode message size (hidden x batch x element size): µs per op."""
    from fixtures.collectives import run_collective

    run_collective(benchmark, llm_bench, tp, ALLREDUCE_CLOCK, batch=batch)


@pytest.mark.benchmark(timer=BUSBW_CLOCK)
def test_allreduce_busbw(benchmark, llm_bench, tp):
    """All-reduce of 256 MiB: algorithm and bus bandwidth (busbw = algbw x 2(n-1)/n)."""
    from fixtures.collectives import run_collective

    run_collective(benchmark, llm_bench, tp, BUSBW_CLOCK, nbytes=BUSBW_BYTES)
