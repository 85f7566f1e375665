"""Per-step overhead at small sizes (issue 16): tuwen's cached ``generate`` against EasyNLP's naive loop on a
2-layer, 64-wide GPT (512 image codes + 100 text ids, 32 text + 16 codes, batch 8, top_k 100), best process-CPU
time of interleaved rounds. At this size the sampler's small tensor ops are a large part of a step.

    OMP_NUM_THREADS=1 python bench/bench_step_overhead.py [rounds]
"""
import sys
import time

import torch

from naive import generate_naive  # bench/naive.py
from tuwen.models.gpt import GPT, GPTConfig
from tuwen.sampling import generate

torch.manual_seed(0)
m = GPT(GPTConfig(vocab_size=612, block_size=48, n_out=512, n_layer=2, n_head=2, n_embd=64)).eval()
kw = dict(prefix_ids=torch.randint(512, 612, (8, 32)), num_tokens=16, seeds=torch.arange(8), top_k=100)
assert torch.equal(generate(m, **kw), generate_naive(m, **kw))
best = {"generate": float("inf"), "naive": float("inf")}
for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 20):
    for name, fn in (("generate", generate), ("naive", generate_naive)):
        c = time.process_time()
        fn(m, **kw)
        best[name] = min(best[name], time.process_time() - c)
print(f"generate {best['generate'] * 1e3:.2f} ms, naive {best['naive'] * 1e3:.2f} ms: "
      f"{best['naive'] / best['generate']:.2f}x ({torch.get_num_threads()} threads, process-CPU time)")
