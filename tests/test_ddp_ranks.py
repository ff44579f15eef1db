"""Two ranks (CPU, gloo) against one: the same sample set, no shard written twice, the same metrics, DDP training in sync.

Each test starts fresh Python processes (never forks the threaded pytest process, never spawns: ddp_spawn on CPU shares
torchmetrics states between ranks).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import HANG_GUARD_S
import torch
from torch import nn

from dg_lightning.generate import generate
from dg_lightning.shards import load_shards, shard_name
from dg_lightning.metrics import GenerativeMetrics

ROOT = Path(__file__).resolve().parents[1]
N, SHARD, SHAPE = 23, 4, (1, 2, 3)

def sample_fn(latents, labels, noise):
    """A toy sampler that also draws later noise from the samples' own streams."""
    return torch.tanh(0.5 * latents + 0.3 * noise.randn_like(latents) + 0.1 * labels.view(-1, 1, 1, 1))


class Flat(nn.Module):
    """uint8 images -> float features (the metrics' stand-in feature network)."""

    num_features = 6

    def forward(self, images):
        return images.flatten(1).float() / 32


def metrics():
    return GenerativeMetrics(Flat(), k=3, kid_subsets=5, kid_subset_size=8, kid_seed=0)


def images(seed, n):
    return torch.randint(0, 256, (n, 1, 2, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


RANKS_SCRIPT = '''
import json, sys
import torch, torch.distributed as dist
sys.path.insert(0, sys.argv[2])
from test_ddp_ranks import images, metrics, sample_fn
torch.set_num_threads(1)
from dg_lightning.distributed import rank_and_world_size
from dg_lightning.generate import generate
from dg_lightning.shards import load_shards

out = sys.argv[1]
dist.init_process_group("gloo")
rank, world_size = rank_and_world_size()
made = []

def logged(latents, labels, noise):
    made.append(len(latents))
    return sample_fn(latents, labels, noise)

generate(logged, f"{out}/samples", 23, (1, 2, 3), batch_size=3, shard_size=4, num_classes=5, progress=False)
samples, labels = load_shards(f"{out}/samples")  # right after generate: its barrier means every shard is there
m = metrics()
for batch in images(1, 40)[rank::world_size].split(7):
    m.update(batch, real=True)
for batch in torch.from_numpy(samples).permute(0, 3, 1, 2)[rank::world_size].split(5):
    m.update(batch, real=False)
result = m.compute()
json.dump({"rank": rank, "world_size": world_size, "made": sum(made), "metrics": result,
           "loaded": samples.tolist(), "labels": labels.tolist()}, open(f"{out}/rank{rank}.json", "w"))
dist.destroy_process_group()
'''


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(script, args, world_size=2, timeout=HANG_GUARD_S):
    """Run `script` in world_size fresh processes with torch.distributed's env:// variables; fail with their output."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world_size),
               OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", script, *args], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world_size)]
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, output in zip(procs, outputs):
        assert p.returncode == 0, output[-3000:]


def reference_metrics(samples):
    """The metrics of the same real images and samples in this one process (no process group)."""
    m = metrics()
    m.update(images(1, 40), real=True)
    m.update(torch.from_numpy(samples).permute(0, 3, 1, 2), real=False)
    return m.compute()


@pytest.mark.slow
def test_ddp_two_ranks_make_the_one_rank_sample_set_and_metrics(tmp_path):
    run_ranks(RANKS_SCRIPT, [str(tmp_path / "two"), str(Path(__file__).parent)])
    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]

    one = tmp_path / "one"
    generate(sample_fn, one, N, SHAPE, batch_size=5, shard_size=SHARD, num_classes=5, progress=False)
    samples, labels = load_shards(one)
    # Byte-identical shards, and the same arrays after load_shards on every rank.
    for k in range(-(-N // SHARD)):
        assert (one / shard_name(k)).read_bytes() == (tmp_path / "two" / "samples" / shard_name(k)).read_bytes(), k
    for r in ranks:
        assert np.array_equal(np.asarray(r["loaded"], np.uint8), samples) and r["labels"] == labels.tolist()
    # Each rank made exactly its shards k % 2 == rank: 3 + 3 shards of 4, less the short last one (shard 5, rank 1).
    assert [r["made"] for r in ranks] == [12, 11]
    assert sum(r["made"] for r in ranks) == N

    expected = reference_metrics(samples)
    assert set(expected) == {"fid", "precision", "recall", "kid"}
    for r in ranks:  # computed once over both ranks' samples: every rank gets the one-process values
        for name, value in expected.items():
            assert r["metrics"][name] == pytest.approx(value, rel=1e-9, abs=1e-12), name


def test_ddp_metrics_of_one_shard_differ_from_all_samples(tmp_path):
    """The check above can fail: one rank's half of the samples gives other values than all of them."""
    fakes_all = images(2, 23)
    whole, half = metrics(), metrics()
    for m, fakes in ((whole, fakes_all), (half, fakes_all[0::2])):
        m.update(images(1, 40), real=True)
        m.update(fakes, real=False)
    assert whole.compute()["fid"] != pytest.approx(half.compute()["fid"], rel=1e-6)


def test_generate_refuses_a_rank_outside_the_world(tmp_path):
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        generate(lambda x, y, n: x, tmp_path, 4, SHAPE, rank=2, world_size=2, progress=False)


def test_metrics_hold_no_state_shared_between_instances():
    """GenerativeMetrics built twice do not share state storage (ddp_spawn's failure mode would be shared memory)."""
    a, b = metrics(), metrics()
    a.update(images(0, 8), real=True)
    assert int(b.fid.real_features_num_samples) == 0 and isinstance(b, GenerativeMetrics)
