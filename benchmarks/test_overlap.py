"""Compute/communication overlap: one benchmark per overlap mode x TP x batch; overlap_gain against
`none` of the same TP and batch, comm_hidden_share with --profile-communication."""
import pytest

pytestmark = pytest.mark.overlap


def test_overlap(benchmark, llm_bench, overlap_mode, tp, batch):
    from fixtures.measure import run_generation

    run_generation(benchmark, llm_bench, llm_bench.key(tp, overlap_mode), batch, "overlap")
