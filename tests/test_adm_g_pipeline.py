"""ADM-G++ (pipeline=imagenet_adm) through the real entry point with +smoke=imagenet_adm, at 32x32 pixels on tiny
random-weight files in the released formats (guided-diffusion's UNet and 256 classifier layouts, an image folder, an
ADM reference batch). Missing inputs and mismatched sizes stop the run before any compute."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from netutils import randomized_zeros
from omegaconf import OmegaConf
from PIL import Image
from test_run import run_py

from dg_lightning import checkpoints
from dg_lightning.config import ConfigError
from dg_lightning.ddpm import DDPMSchedule, ddpm_sampler
from dg_lightning.evaluation import PooledPixels
from dg_lightning.generate import SampleNoise
from dg_lightning.guidance import ClassifierGuidance, DiscriminatorGuidance
from dg_lightning.imagenet import adm_sample_fn
from dg_lightning.nets import adm, unet
from dg_lightning.pipeline import run

TESTS = Path(__file__).resolve().parent
SMOKE = OmegaConf.load(TESTS.parent / "conf" / "smoke" / "imagenet_adm.yaml")
EXPERIMENT = "imagenet_adm_g++"
CLASSES = ("n01440764", "n01443537", "n01484850")
SIZE = SMOKE.data.image_size


def tiny_unet():
    """The smoke's UNet; its zero-initialised output layer gets small weights, so the learned-range v stays near
    [-1, 1] (larger |v| extrapolates the variance far beyond beta and the samples blow up)."""
    return randomized_zeros(unet.adm256_cond(**SMOKE.score.overrides), scale=0.02)


def tiny_classifier():
    """The smoke's classifier layout (see conf/smoke/imagenet_adm.yaml), saved as 256x256_classifier.pt."""
    spec = checkpoints.ADM_CLASSIFIERS[SMOKE.discriminator.classifier.config]
    return randomized_zeros(spec.build(**SMOKE.discriminator.classifier.overrides), seed=2)


def write_released_files(folder):
    """The tiny released files under their released names, a class-folder image set of odd sizes and a reference batch."""
    folder.mkdir(exist_ok=True)
    torch.save(tiny_unet().state_dict(), folder / "256x256_diffusion.pt")
    torch.save(tiny_classifier().state_dict(), folder / "256x256_classifier.pt")
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (folder / "imagenet" / "train" / name).mkdir(parents=True)
        for j in range(4):
            pixels = rng.integers(0, 256, (40 + 8 * j, 32 + 20 * c, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / "imagenet" / "train" / name / f"{name}_{j}.JPEG", quality=95)
    images = rng.integers(0, 256, (24, SIZE, SIZE, 3), dtype=np.uint8)
    with torch.no_grad():
        pool, spatial, _ = PooledPixels()(torch.from_numpy(images).permute(0, 3, 1, 2))
    pool, spatial = pool.double().numpy(), spatial.double().numpy()
    np.savez(folder / "VIRTUAL_imagenet256_labeled.npz", arr_0=images, mu=pool.mean(0), sigma=np.cov(pool, rowvar=False),
             mu_s=spatial.mean(0), sigma_s=np.cov(spatial, rowvar=False))
    return folder


def overrides(released, *more):
    return [f"experiment={EXPERIMENT}", "+smoke=imagenet_adm", f"paths.released_dir={released}", *more]


def cache(tmp_path, stage):
    return sorted((tmp_path / "logs" / "cache" / EXPERIMENT).glob(f"{stage}-*"))


@pytest.mark.slow
def test_smoke_runs_every_stage_in_pixel_space_and_dg_weight_zero_is_adm_g(tmp_path, compose_cfg):
    released = write_released_files(tmp_path / "released")
    run_py(tmp_path, *overrides(released))

    (run_dir,) = (tmp_path / "logs" / EXPERIMENT / "runs").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    names = ("fid", "sfid", "is", "precision", "recall")
    assert set(metrics) == {f"{p}/{k}" for p in ("eval", "eval_unguided") for k in names}
    assert all(np.isfinite(v) for v in metrics.values())
    assert metrics["eval/fid"] != metrics["eval_unguided/fid"]  # DG changed the samples
    with np.load(run_dir / "eval_samples.npz") as guided, np.load(run_dir / "eval_unguided_samples.npz") as baseline:
        assert guided["arr_0"].dtype == np.uint8 and guided["arr_0"].shape == (SMOKE.metrics.num_samples, SIZE, SIZE, 3)
        assert np.array_equal(guided["arr_1"], baseline["arr_1"])  # same seeds, same labels

    # Real images are stored as uint8 centre crops (no autoencoder), fakes as uint8 ADM-G images; both were read
    # memory-mapped from the .npy copies beside the shards.
    (real,) = cache(tmp_path, "encode")
    shard = np.load(real / "shard-000000.npz")
    assert shard["samples"].dtype == np.uint8 and shard["samples"].shape == (4 * len(CLASSES), SIZE, SIZE, 3)
    assert np.array_equal(np.load(real / "samples.npy", mmap_mode="r"), shard["samples"])
    assert np.array_equal(np.load(real / "labels.npy"), np.repeat(np.arange(len(CLASSES)), 4))
    (fakes,) = cache(tmp_path, "generate")
    shard = np.load(fakes / "shard-000000.npz")
    assert shard["samples"].dtype == np.uint8 and shard["samples"].shape == (SMOKE.data.num_fake, SIZE, SIZE, 3)
    assert np.array_equal(np.load(fakes / "samples.npy"), shard["samples"])

    # DG weight 0: ADM-G++ is exactly ADM-G with the same CG schedule, reusing the crops, fakes and head.
    zero = run(compose_cfg(*overrides(released, "logger=csv", "guidance.dg.weight=0")))
    assert all(zero[f"eval/{k}"] == zero[f"eval_unguided/{k}"] == metrics[f"eval_unguided/{k}"] for k in names)
    assert len(cache(tmp_path, "encode")) == len(cache(tmp_path, "generate")) == len(cache(tmp_path, "train")) == 1


def test_sampler_wiring_matches_ddpm_sampler_with_the_table_d1_schedules(tmp_path, compose_cfg):
    cfg = compose_cfg(*overrides(tmp_path, "sampler.respacing=4"))  # k = 999, 666 (CG 0.75) and 333, 0 (CG 1.5)
    model, classifier = tiny_unet().eval(), tiny_classifier().eval().requires_grad_(False)
    discriminator = adm.Discriminator(classifier, randomized_zeros(adm.dg_head(SMOKE.discriminator.head.in_channels, 1000), seed=1))
    latents = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    labels, schedule = torch.tensor([3, 999]), DDPMSchedule(1000, "4")
    cg = ClassifierGuidance(lambda x, tau: classifier(x, 999.0 * tau))

    def expected(**kwargs):
        with torch.no_grad():
            return ddpm_sampler(model, latents, labels, schedule, classifier=cg, clip_denoised=True,
                                randn_like=SampleNoise([5, 6]).randn_like, **kwargs)

    fakes = adm_sample_fn(cfg, model, classifier, fake_cg_scale=1.0)(latents, labels, SampleNoise([5, 6]))
    assert torch.equal(fakes, expected(cg_scale=1.0))
    schedules = {"cg_scale": 0.75, "cg_scale_late": 1.5, "cg_switch_step": 650, "eds": True}
    baseline = adm_sample_fn(cfg, model, classifier)(latents, labels, SampleNoise([5, 6]))
    assert torch.equal(baseline, expected(**schedules))
    guided = adm_sample_fn(cfg, model, classifier, discriminator)(latents, labels, SampleNoise([5, 6]))
    dg = DiscriminatorGuidance(discriminator, t_min=0.01, t_max=1.0, clip=1e-5)
    reference = expected(**schedules, dg=dg, dg_weight=1.0, dg_switch_step=0, dg_boost=1 / 0.75, dg_norm_ratio=True)
    assert torch.allclose(guided, reference, atol=1e-5)
    assert not torch.allclose(guided, baseline, atol=1e-3)
    assert not torch.allclose(baseline, fakes, atol=1e-3)


@pytest.mark.parametrize("remove, key", [
    ("256x256_diffusion.pt", "score.checkpoint"),
    ("256x256_classifier.pt", "discriminator.classifier.path"),
    ("VIRTUAL_imagenet256_labeled.npz", "metrics.reference_batch"),
])
def test_a_missing_released_file_stops_the_run_before_any_compute(tmp_path, compose_cfg, remove, key):
    released = write_released_files(tmp_path / "released")
    (released / remove).unlink()
    with pytest.raises(ConfigError, match=rf"config key '{key}': .*{remove} does not exist.*download it from"):
        run(compose_cfg(*overrides(released, "logger=csv")))
    assert not (tmp_path / "logs" / "cache").exists()


@pytest.mark.parametrize("setting, key", [
    ("sampler.cg_scale=-1", "sampler.cg_scale"),
    ("sampler.dg_boost=0", "sampler.dg_boost"),
    ("data.image_size=64", "score.checkpoint"),
])
def test_bad_settings_stop_the_run_before_any_compute(tmp_path, compose_cfg, setting, key):
    released = write_released_files(tmp_path / "released")
    with pytest.raises(ConfigError, match=rf"config key '{key}'"):
        run(compose_cfg(*overrides(released, "logger=csv", setting)))
    assert not any((tmp_path / "logs" / "cache").rglob("shard-*.npz"))


def test_the_256_classifier_is_registered_with_linear_time():
    spec = checkpoints.ADM_CLASSIFIERS["adm256"]
    assert spec.build is adm.adm256_classifier and spec.time_map is None
    with torch.device("meta"):
        net = spec.build()
    assert (net.image_size, net.feature_channels, net.feature_size) == (256, 512, 8)


def test_load_adm_unet_is_strict_and_names_the_file(tmp_path):
    net = tiny_unet()
    path = tmp_path / "256x256_diffusion.pt"
    torch.save(net.state_dict(), path)
    loaded = checkpoints.load_adm_unet(path, **SMOKE.score.overrides)
    x, t, y = torch.randn(2, 3, SIZE, SIZE), torch.tensor([10.0, 900.0]), torch.tensor([1, 999])
    assert torch.equal(loaded(x, t, y), net(x, t, y)) and not loaded.training
    with pytest.raises(checkpoints.CheckpointError, match=r"256x256_diffusion.pt does not match guided-diffusion's "
                                                          r"256x256 conditional UNet"):
        checkpoints.load_adm_unet(path, **{**SMOKE.score.overrides, "num_res_blocks": 2})
