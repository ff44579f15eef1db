"""Discriminator training under Lightning DDP (trainer=ddp_cpu: 2 CPU processes, gloo), started as run.py starts it
(recipe.launch), with the sampling callback sharded over the ranks."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import HANG_GUARD_S
import torch

from dg_lightning.module import BCELoss
from dg_lightning.nets.mlp import MLPDiscriminator
from dg_lightning.sde import LinearVP

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = '''
import json, sys
import numpy as np, torch, torch.distributed as dist
from hydra import compose, initialize_config_dir
from torch import nn
from dg_lightning.callbacks import SamplingTask
from dg_lightning.data import ArraySource
from dg_lightning.files import load_weights
from dg_lightning.metrics import GenerativeMetrics
from dg_lightning.pipelines.recipe import launch, stage_dir
from dg_lightning.training import build_network, train_discriminator
torch.set_num_threads(1)
out = sys.argv[1]
with initialize_config_dir(config_dir=sys.argv[2], version_base="1.3"):
    cfg = compose("config", overrides=["trainer=ddp_cpu", "trainer.max_epochs=3", "trainer.max_steps=-1",
                                       "data.num_held_out=8",
                                       "data.batch_size=32", "discriminator.net.width=32", "discriminator.net.depth=2",
                                       "discriminator.net.time_dim=16", "discriminator.lr=3e-3",
                                       "callbacks.sampling.every_n_epochs=1", "callbacks.sampling.num_samples=30",
                                       "callbacks.sampling.grid_size=4", "callbacks.sampling.monitor=fid", f"+callbacks.sampling.out_dir={out}/sampling",
                                       f"paths.cache_dir={out}/cache", f"paths.output_dir={out}/out"])
launch(cfg)
rank, world_size = dist.get_rank(), dist.get_world_size()
rng = np.random.default_rng(0)
real = ArraySource(rng.normal(size=(128, 2)).astype(np.float32), name="real")
fake = ArraySource((rng.normal(size=(128, 2)) * 2.0 + 1.5).astype(np.float32), name="fake")


class Flat(nn.Module):
    num_features = 2

    def forward(self, images):
        return images.flatten(1).float() / 64


def sample_fn(discriminator, latents, labels, noise):
    x = latents.flatten(1)
    logit = discriminator(x, torch.full((len(x),), 0.5))
    return torch.tanh(0.4 * latents + 0.05 * logit.view(-1, 1, 1, 1))


reals = torch.randint(0, 256, (40, 1, 1, 2), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
task = SamplingTask(sample_fn, GenerativeMetrics(Flat(), reset_real_features=False), (1, 1, 2), real_images=reals,
                    batch_size=8)
folder, record = stage_dir(cfg, "train", ["seed", "trainer", "data"]), {}
net = train_discriminator(cfg, real, fake, build_network(cfg, cfg.discriminator.net), [], folder, lambda: task,
                          record)
torch.save(net.state_dict(), f"{out}/rank{rank}.pt")
state = next(v for k, v in load_weights(folder / "checkpoints" / "last.ckpt")["callbacks"].items() if "GuidedSampling" in k)
json.dump({"world_size": world_size, "history": state["history"], "best_epoch": record["sampling/best_epoch"]},
          open(f"{out}/rank{rank}.json", "w"))
'''


@pytest.mark.slow
def test_ddp_discriminator_training_keeps_ranks_in_sync_and_learns(tmp_path):
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(tmp_path), str(ROOT / "conf")], check=False,
                            capture_output=True,
                            text=True, timeout=HANG_GUARD_S, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    weights = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    # DDP averages the gradients: the ranks, which draw different diffusion noise, end with identical weights.
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name
    (train_dir,) = (tmp_path / "cache" / "toy2d").glob("train-*")
    saved = torch.load(train_dir / "discriminator.pt", weights_only=True)  # written once, by rank 0
    assert all(torch.equal(saved[name], value) for name, value in weights[0].items())
    # The sampling callback's metrics are reduced over both ranks' samples: the same history on each rank.
    assert ranks[0]["history"] == ranks[1]["history"] and [h["epoch"] for h in ranks[0]["history"]] == [0, 1, 2]
    # checkpoints.keep=1: the epoch checkpoint kept is the callback's best epoch, as both ranks agree.
    assert ranks[0]["best_epoch"] == ranks[1]["best_epoch"]
    assert [p.name for p in (train_dir / "checkpoints").glob("epoch*.ckpt")] == [f"epoch{ranks[0]['best_epoch']:03d}.ckpt"]
    assert (tmp_path / "sampling" / "samples_epoch2.png").is_file()

    # It learned: the trained discriminator's BCE on fresh diffused real/fake points is below the untrained one's.
    torch.manual_seed(0)
    untrained = MLPDiscriminator(2, 32, 2, 16)
    trained = MLPDiscriminator(2, 32, 2, 16)
    trained.load_state_dict(weights[0])
    rng = np.random.default_rng(1)
    x0 = torch.from_numpy(np.concatenate([rng.normal(size=(2000, 2)), rng.normal(size=(2000, 2)) * 2.0 + 1.5])).float()
    is_real = torch.arange(4000) < 2000
    t = torch.full((4000,), 0.05)
    x_t = LinearVP().diffuse(x0, t, torch.randn(x0.shape, generator=torch.Generator().manual_seed(2)))
    with torch.no_grad():
        losses = [BCELoss()(net(x_t, t), is_real).mean().item() for net in (untrained, trained)]
    assert losses[1] < losses[0] - 0.05, losses


PRETRAIN_SCRIPT = '''
import sys
import lightning as L, numpy as np, torch, torch.distributed as dist
from hydra import compose, initialize_config_dir
from torch import nn
from dg_lightning import training
from dg_lightning.pipelines import recipe
from dg_lightning.data import ArraySource
torch.set_num_threads(1)
out, conf, cache, tag, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
with initialize_config_dir(config_dir=conf, version_base="1.3"):
    cfg = compose("config", overrides=["trainer=ddp_cpu", "callbacks=none", "~callbacks.sampling", f"paths.cache_dir={out}/{cache}"])
recipe.launch(cfg)
training.PRETRAIN_CHECKPOINT_STEPS = 4  # last.ckpt every 2 epochs of 2 steps


class Noisy(L.LightningModule):
    """w pulled towards the batch mean plus fresh global-RNG noise; each rank writes its (step, noise) lines."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))

    def training_step(self, batch, batch_idx):
        if self.global_step == kill_at:
            raise RuntimeError("killed")
        noise = torch.randn(2)
        with open(f"{out}/{tag}-rank{self.global_rank}.txt", "a") as f:
            f.write(f"{self.global_step} {noise.tolist()}\\n")
        return ((self.w - batch["x0"].mean(0) - noise) ** 2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


module = Noisy()
points = ArraySource(np.arange(16, dtype=np.float32).reshape(8, 2), name="points")
folder = recipe.stage_dir(cfg, "pretrain_noisy", ["seed"])
folder.mkdir(parents=True, exist_ok=True)
training.pretrain(cfg, module, points, 2, 8, module, folder / "w.pt")
'''


@pytest.mark.slow
def test_ddp_pretraining_draws_different_noise_per_rank_and_resumes_every_ranks_stream(tmp_path):
    script = tmp_path / "pretrain_ddp.py"
    script.write_text(PRETRAIN_SCRIPT)

    def pretrain(cache, tag, kill_at=-1):
        return subprocess.run([sys.executable, str(script), str(tmp_path), str(ROOT / "conf"), cache, tag, str(kill_at)],
                              check=False, capture_output=True, text=True, timeout=HANG_GUARD_S, cwd=tmp_path)

    def lines(tag, rank):
        return (tmp_path / f"{tag}-rank{rank}.txt").read_text().splitlines()

    result = pretrain("a", "uninterrupted")
    assert result.returncode == 0, result.stderr[-3000:]
    uninterrupted = [lines("uninterrupted", r) for r in range(2)]
    assert [len(u) for u in uninterrupted] == [8, 8]  # 8 steps of 2 per epoch on each rank
    # The ranks are seeded apart: their noise differs at every step.
    assert all(a.split(" ", 1)[1] != b.split(" ", 1)[1] for a, b in zip(*uninterrupted))

    assert pretrain("b", "killed", kill_at=6).returncode != 0
    (folder,) = (tmp_path / "b" / "toy2d").glob("pretrain_noisy-*")
    killed = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
    assert killed["global_step"] == 4 and len(killed["callbacks"]["RNGStates"]["ranks"]) == 2
    result = pretrain("b", "resumed")
    assert result.returncode == 0, result.stderr[-3000:]
    # Each rank resumes its own stream: steps 4 to 7 draw the uninterrupted run's noise, and the weights agree.
    assert [lines("resumed", r) for r in range(2)] == [u[4:] for u in uninterrupted]
    (done,) = (tmp_path / "a" / "toy2d").glob("pretrain_noisy-*")
    assert torch.equal(torch.load(folder / "w.pt", weights_only=True)["w"], torch.load(done / "w.pt", weights_only=True)["w"])
