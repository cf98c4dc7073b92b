"""DistributedDataParallel over a converted model: two real gloo processes on CPU."""
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import kalmannorm as kn


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    torch.manual_seed(0)  # same initial weights on both ranks
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )
    model = nn.parallel.DistributedDataParallel(kn.convert_batchnorm(net, micro_batch=2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank sees its own data
    losses = []
    for _ in range(5):
        x = torch.randn(8, 3, 8, 8, generator=gen)
        y = torch.randint(0, 4, (8,), generator=gen)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    torch.save({"params": [p.detach() for p in model.parameters()], "losses": losses,
                "priors": kn.guard_report(model)["priors"]},
               os.path.join(out_dir, f"rank{rank}.pt"))
    del model  # before the group: a DDP reducer freeing the last ref to a gloo group can hang
    dist.destroy_process_group()


def test_ddp_two_ranks_train_and_stay_identical():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        r0, r1 = (torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2))
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)
    assert r0["losses"] != r1["losses"]  # different data on each rank
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in (r0, r1))
    assert r0["priors"] == 5 * 4  # the second layer had a prior at every step, in 4 groups
