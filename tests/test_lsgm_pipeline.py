"""LSGM-G++ (pipeline=lsgm) through the real entry point with +smoke=lsgm, on tiny random-weight files written here in
the released formats: LSGM's checkpoint_fid.pt (a tiny NVAE and latent score model), the authors' true_data.npz and an
FID reference npz. Missing files and impossible settings stop the run before any compute."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from netutils import randomized_zeros, write_lsgm_checkpoint
from omegaconf import OmegaConf
from test_run import run_py

from dg_lightning.checkpoints import LSGM_SOURCE, load_lsgm
from dg_lightning.config import ConfigError
from dg_lightning.latents import NVAELatents
from dg_lightning.nets import ncsnpp, nvae
from dg_lightning.pipelines import run
from dg_lightning.seeds import SampleNoise, sample_seed, stream_base_seed

SMOKES = Path(__file__).resolve().parents[1] / "conf" / "smoke"
SMOKE, SMOKE_LSGM = OmegaConf.load(SMOKES / "released.yaml"), OmegaConf.load(SMOKES / "lsgm.yaml")
SCORE = OmegaConf.to_container(SMOKE_LSGM.score.overrides)
VAE = OmegaConf.to_container(SMOKE_LSGM.score.vae_overrides)
# The args of the LSGM run that trained the tiny networks (the rest from the released run's).
ARGS = dict(num_channels_dae=SCORE["nf"], num_scales_dae=len(SCORE["ch_mult"]), num_cell_per_scale_dae=1,
            embedding_dim=SCORE["embedding_dim"], num_groups_per_scale=VAE["num_groups"],
            num_latent_per_group=VAE["latent_per_group"])
NUM_REAL = 40
EXPERIMENT = "cifar10_lsgm_g++"


def write_released_files(folder):
    """checkpoint_fid.pt (the tiny networks of +smoke=lsgm, random weights), true_data.npz (32x32 images) and the FID
    reference cifar10-32x32.npz in the smoke's feature space, in `folder`."""
    folder.mkdir(exist_ok=True)
    torch.manual_seed(0)
    vae = nvae.cifar10(**VAE)
    write_lsgm_checkpoint(folder / "checkpoint_fid.pt", randomized_zeros(ncsnpp.lsgm_cifar10(**SCORE)).state_dict(),
                          vae.state_dict(), **ARGS)
    images = np.random.default_rng(0).integers(0, 256, (NUM_REAL, 32, 32, 3), dtype=np.uint8)
    np.savez(folder / "true_data.npz", images)
    with torch.no_grad():
        real = instantiate(SMOKE.metrics.feature_net)(torch.from_numpy(images).permute(0, 3, 1, 2)).double().numpy()
    np.savez(folder / "cifar10-32x32.npz", mu=real.mean(0), sigma=np.cov(real, rowvar=False))
    return folder


def cache(tmp_path, stage):
    return sorted((tmp_path / "logs" / "cache" / EXPERIMENT).glob(f"{stage}-*"))


@pytest.mark.slow
def test_smoke_runs_every_stage_on_latents_and_caches_them(tmp_path):
    released = write_released_files(tmp_path / "released")
    run_py(tmp_path, f"experiment={EXPERIMENT}", "+smoke=lsgm", f"paths.released_dir={released}")

    (run_dir,) = (tmp_path / "logs" / EXPERIMENT / "runs").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {f"{p}/{k}" for p in ("eval", "eval_unguided") for k in ("fid", "precision", "recall", "nfe")} | {
        "sampling/best_epoch", "sampling/best_fid"} <= set(metrics)
    assert all(np.isfinite(v) for v in metrics.values())
    # RK45 on the latent PF-ODE spends 2 score-model evaluations to start and 6 per tried step (LSGM does not denoise).
    assert all(metrics[f"{p}/nfe"] >= 8 and (metrics[f"{p}/nfe"] - 2) % 6 == 0 for p in ("eval", "eval_unguided"))
    assert metrics["eval/fid"] != metrics["eval_unguided/fid"]  # DG changed the samples
    (logged,) = [row for row in csv.DictReader((run_dir / "csv" / "metrics.csv").open()) if row.get("sampling/fid")]
    assert int(logged["epoch"]) == metrics["sampling/best_epoch"] == 0
    assert float(logged["sampling/fid"]) == pytest.approx(metrics["sampling/best_fid"], rel=1e-6)

    # The real data are the NVAE's posterior samples of the first data.num_real images, each drawn from its own seed.
    _, vae = load_lsgm(released / "checkpoint_fid.pt", VAE, **SCORE)
    (encoded,) = cache(tmp_path, "encode")
    shard = np.load(encoded / "shard-000000.npz")
    latent_shape = (VAE["num_groups"] * VAE["latent_per_group"], 16, 16)
    assert shard["samples"].shape == (SMOKE.data.num_real, *latent_shape) and shard["samples"].dtype == np.float32
    images = np.load(released / "true_data.npz")["arr_0"][:3]
    noise = SampleNoise([sample_seed(stream_base_seed(0, "real"), i) for i in range(3)])
    expected = NVAELatents(vae).encode(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1, noise)
    torch.testing.assert_close(torch.from_numpy(shard["samples"][:3]), expected, rtol=1e-5, atol=1e-5)
    (fakes,) = cache(tmp_path, "generate")
    assert np.load(fakes / "shard-000000.npz")["samples"].shape == (SMOKE.data.num_fake + SMOKE.data.num_held_out,
                                                                    *latent_shape)
    # The discriminator is trained whole: every parameter is in the epoch checkpoint (nothing frozen is left out).
    (train,) = cache(tmp_path, "train")
    weights = torch.load(train / "discriminator.pt", weights_only=True)
    checkpoint = torch.load(train / "checkpoints" / "epoch000.ckpt", weights_only=True)
    assert weights and all(k.startswith("net.") for k in weights)
    assert set(checkpoint["state_dict"]) == {f"discriminator.{k}" for k in weights}
    held_out = json.loads((train / "held_out.json").read_text())["epochs"]
    assert [e["epoch"] for e in held_out] == [0] and sum(held_out[0]["count"]) == 2 * SMOKE.data.num_held_out
    (unguided,) = cache(tmp_path, "sample_unguided")
    assert np.load(unguided / "shard-000000.npz")["samples"].shape == (SMOKE.metrics.num_samples, 32, 32, 3)

    # Run again: every stage that makes files from the cache (load reads the checkpoint, sample scores), the same figures.
    result = run_py(tmp_path, f"experiment={EXPERIMENT}", "+smoke=lsgm", f"paths.released_dir={released}")
    cached = [line.split(":")[0].split()[-1] for line in result.stdout.splitlines() if "from the cache" in line]
    assert cached == ["encode", "generate", "train", "sample_unguided"]
    again = max((tmp_path / "logs" / EXPERIMENT / "runs").iterdir())
    assert json.loads((again / "metrics.json").read_text()) == metrics


def compose(compose_cfg, released, *overrides):
    return compose_cfg(f"experiment={EXPERIMENT}", "+smoke=lsgm", f"paths.released_dir={released}", "logger=csv",
                       *overrides)


@pytest.mark.parametrize("name, key", [("checkpoint_fid.pt", "score.checkpoint"), ("true_data.npz", "data.path"),
                                       ("cifar10-32x32.npz", "metrics.fid_reference")])
def test_a_missing_released_file_names_its_key_file_and_source_before_any_stage(tmp_path, compose_cfg, name, key):
    released = write_released_files(tmp_path / "released")
    (released / name).unlink()
    with pytest.raises(ConfigError, match=key) as error:
        run(compose(compose_cfg, released))
    assert str(released / name) in str(error.value)
    if key == "score.checkpoint":
        assert LSGM_SOURCE in str(error.value)
    assert not (tmp_path / "logs" / "cache").exists()


@pytest.mark.parametrize("overrides, key", [(["trainer.max_epochs=0"], "trainer.max_epochs"),
                                            (["data.num_real=4", "data.num_held_out=4"], "data.num_held_out")])
def test_settings_that_cannot_train_the_discriminator_are_refused_before_any_stage(tmp_path, compose_cfg, overrides, key):
    released = write_released_files(tmp_path / "released")
    with pytest.raises(ConfigError, match=key):
        run(compose(compose_cfg, released, *overrides))
    assert not (tmp_path / "logs" / "cache").exists()
