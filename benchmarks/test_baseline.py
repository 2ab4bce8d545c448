"""Single-device baseline: one generation per round (a batch of random-token prompts of
--prompt-len, exactly --max-tokens output tokens); E2E is the timed value, TTFT/ITL/TPOT/tok/s and
bandwidth use go to extra_info."""
import pytest

pytestmark = pytest.mark.baseline


def test_baseline(benchmark, llm_bench, batch):
    from fixtures.measure import run_generation

    run_generation(benchmark, llm_bench, llm_bench.key(1), batch, "baseline")
