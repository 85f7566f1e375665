"""Run under torchrun (2 processes): a tiny tuwen GPT sharded per block with tuwen.training.fsdp takes the same
SGD steps as one unsharded copy trained on both ranks' batches (SGD: AdamW would blow up the float noise of
gradients that are 0 in theory, like key biases); writes OK to the path in argv[1] on rank 0."""
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule

from tuwen.models.gpt import GPT, GPTConfig
from tuwen.training import fsdp as FS


def build():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=40, block_size=16, n_out=40, n_layer=3, n_head=2, n_embd=32))


def loss_of(model, idx):
    logits = model(idx[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, 40), idx[:, 1:].reshape(-1))


def main():
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    data = torch.randint(0, 40, (3, 2, 4, 12), generator=torch.Generator().manual_seed(1))  # step, rank, B, T
    sharded, ref = FS.shard(build(), torch.device("cpu"), "fp32"), build()
    units = sum(isinstance(m, FSDPModule) for m in sharded.modules())
    assert units == 3 + 1, units  # one per block + the root
    opt_s = torch.optim.SGD(sharded.parameters(), lr=0.5)
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.5)
    for step in range(3):
        loss_of(sharded, data[step, rank]).backward()
        opt_s.step()
        opt_s.zero_grad()
        loss_of(ref, data[step].reshape(8, 12)).backward()
        opt_r.step()
        opt_r.zero_grad()
    full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(full[k], v, rtol=1e-4, atol=1e-5, msg=k)
    if rank == 0:
        open(sys.argv[1], "w").write("OK")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
