"""Run under torchrun (2 processes, gloo, CPU): a converted tiny Llama trains under DDP or FSDP2.

Rank 0 saves the first step's gradients (full tensors) so the test can compare them with one process.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import zoo  # noqa: E402

import mka_compile  # noqa: E402

CFG = mka_compile.MKAConfig(gate_init=0.5, chunk_size=4, top_r=2)  # gate != 0: every new weight gets gradient


def build() -> torch.nn.Module:
    model, _ = zoo.causal_lm("llama", "sdpa", seed=0)
    mka_compile.convert(model, config=CFG)
    return model.train()


def batch() -> torch.Tensor:
    return torch.randint(0, 90, (4, 12), generator=torch.Generator().manual_seed(1))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["ddp", "fsdp2"], required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build()
    if args.mode == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        wrapped = model
    opt = torch.optim.SGD(wrapped.parameters(), lr=1e-2)
    ids = batch()
    shard = ids.chunk(world)[rank]
    for step in range(3):
        loss = wrapped(shard, labels=shard, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        if step == 0:
            grads = {}
            for name, prm in model.named_parameters():
                g = prm.grad
                g = g.full_tensor() if hasattr(g, "full_tensor") else g
                grads[name.removeprefix("module.")] = g.detach().clone()
            if rank == 0:
                torch.save(grads, args.out)
        opt.step()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
