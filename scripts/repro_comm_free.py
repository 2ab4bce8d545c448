"""Repro on GPUs: generate, then a comm-free generate, then generate again (same batch/prompt)."""
import sys

from overlap.engine import EngineConfig, TPEngine
from overlap.generate import random_prompts

graphs = sys.argv[1] == "graphs"
ar = sys.argv[2]
with TPEngine(EngineConfig(model="llama3-1b", tp=2, device="cuda", batch_sizes=(1,), max_seq=64,
                           cuda_graphs=graphs, allreduce=ar, timeout_s=60)) as e:
    p = random_prompts(1, 32, 128256, 0)
    a = e.generate(p, 16).tokens
    e.generate(p, 16, comm_free=True)
    b = e.generate(p, 16).tokens
    print("OK", graphs, ar, "same tokens:", a == b)
