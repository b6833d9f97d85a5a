"""DDP job for tests/test_compat.py: two ranks (gloo, CPU) train under OMC.

Run by ``torchrun --nproc_per_node=2 tests/jobs/ddp_train.py MODE OUT``: each
rank trains the same compressed model on its half of every global batch;
after every step the ranks compare their codes. Rank 0 writes the decoded
weights and the per-step agreement to OUT (JSON).
"""

import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist

from speechbrain_omc import OMCConfig, compress_module


def model_and_batches():
    """The model every rank starts from, and the global batches (seeded)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)
    )
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen))]
    return model, batches * 1 + [
        (torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen))
        for _ in range(3)
    ]


def codes_digest(handle) -> str:
    digest = hashlib.sha256()
    for name, slot in sorted(handle.slots.items()):
        digest.update(name.encode() + slot.codes.to_bytes())
    return digest.hexdigest()


def main(mode: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    model, batches = model_and_batches()
    handle = compress_module(model, OMCConfig(format="e3m7", update_mode=mode))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    handle.set_sgd(lr=0.1, momentum=0.9)
    agree = []
    for x, y in batches:
        half = x.shape[0] // world
        part = slice(rank * half, (rank + 1) * half)
        loss = torch.nn.functional.mse_loss(ddp(x[part]), y[part])
        loss.backward()
        handle.step()  # fused updates from the all-reduced gradients
        optimizer.step()
        optimizer.zero_grad()
        digests = [None] * world
        dist.all_gather_object(digests, codes_digest(handle))
        agree.append(len(set(digests)) == 1)
    weights = {n: s.codes.decompress().tolist() for n, s in handle.slots.items()}
    # The optimizer before the fused updates would update twice: refused.
    refused = None
    if mode == "fused":
        x, y = batches[0]
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        try:
            optimizer.step()
            refused = False
        except RuntimeError as error:
            refused = "call handle.step() before optimizer.step()" in str(error)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"agree": agree, "weights": weights, "refused": refused}, f)
    # The DDP wrapper goes before its process group (the reverse order can
    # hang the interpreter's exit).
    del ddp, optimizer
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(*sys.argv[1:])
