"""The forward pass's blocks under --compile (overlap/model.py `compiled_blocks`) against the same
blocks eager, on a CUDA GPU in fp32. Inductor rewrites them: batch-1 GEMVs become Triton reductions
and the two gate/up products are fused with SiLU*mul, so both the one-row (decode at batch 1) and the
several-row shapes are checked. CPU runs the blocks eager only; skipped there."""
from __future__ import annotations

import pytest

from overlap.engine import visible_gpus

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(visible_gpus() < 1, reason="needs a CUDA GPU")]


@pytest.mark.parametrize("rows", [1, 3])
def test_compiled_blocks_match_eager(rows):
    import torch

    from overlap.model import EAGER, compiled_blocks

    hidden, inter, vocab = 1024, 2816, 4096
    g = torch.Generator(device="cuda").manual_seed(rows)
    rnd = lambda *s, scale=1.0: torch.randn(*s, generator=g, device="cuda") * scale  # noqa: E731
    x, delta, norm_w = rnd(rows, 1, hidden), rnd(rows, 1, hidden), 1 + rnd(hidden, scale=0.1)
    w, w13, head = rnd(hidden, hidden, scale=0.03), rnd(2 * inter, hidden, scale=0.03), rnd(vocab, hidden, scale=0.03)
    comp = compiled_blocks()
    for name, args in (("norm", (x, delta, norm_w, 1e-5)), ("matvec", (x, w)), ("swiglu_up", (x, w13, inter)),
                       ("greedy", (x[:, 0] @ head.t(),))):
        want, got = getattr(EAGER, name)(*args), getattr(comp, name)(*args)
        for a, b in zip(want if isinstance(want, tuple) else (want,), got if isinstance(got, tuple) else (got,)):
            if a.dtype == torch.long:  # greedy's index: equal where the max is not a near-tie
                assert torch.equal(a, b), name
            else:
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
