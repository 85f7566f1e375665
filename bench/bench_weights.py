"""Per-step decode time of a base-size GPT (12×768, pai-painter shape, random weights, greedy, 24 codes)
with fp32, bf16 and int8 weight-only Linear layers, w8a8 (int8 weights and per-row int8 activations, fbgemm on
x86 CPUs, else torch._int_mm; all tuwen.models.quant) and torch.ao dynamic int8 quantisation (weights and
activations), interleaved over R rounds; prints the best wall and process-CPU ms per step so far.

    OMP_NUM_THREADS=1 python bench/bench_weights.py 5 [ROWS]

ROWS (default 1): batch rows decoded together (8: a batch of 8, or 4 images with classifier-free guidance).
"""
import torch, time, sys, copy, warnings
warnings.filterwarnings("ignore")
from tuwen.models.gpt import GPT, GPTConfig
from tuwen.models.quant import quantize_weights
from tuwen.sampling import generate
torch.manual_seed(0)
cfg = GPTConfig.preset("base", vocab_size=37512, block_size=288, n_out=16384)
base = GPT(cfg).eval()
B = int(sys.argv[2]) if len(sys.argv) > 2 else 1
prefix = torch.randint(16384, 37512, (B, 32))
N=24
ms={}
for wd in ["fp32","bf16","int8","w8a8","aodyn"]:
    m = copy.deepcopy(base)
    if wd=="aodyn": m = torch.ao.quantization.quantize_dynamic(m,{torch.nn.Linear},dtype=torch.qint8)
    else: quantize_weights(m, wd)
    ms[wd]=m
kw=dict(prefix_ids=prefix, seeds=list(range(B)), top_k=1, num_tokens=N, use_cuda_graph=False)
best={k:1e9 for k in ms}; cb={k:1e9 for k in ms}
for r in range(int(sys.argv[1])):
    for k,m in ms.items():
        t=time.perf_counter(); c=time.process_time(); generate(m,**kw); best[k]=min(best[k],(time.perf_counter()-t)/N*1e3); cb[k]=min(cb[k],(time.process_time()-c)/N*1e3)
    print(r, 'wall', ' '.join(f"{k}={v:.1f}" for k,v in best.items()), '| cpu', ' '.join(f"{k}={v:.1f}" for k,v in cb.items()), flush=True)
