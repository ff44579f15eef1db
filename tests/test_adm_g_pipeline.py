"""ADM-G++ (pipeline=imagenet_adm) through the real entry point with +smoke=imagenet_adm, at 32x32 pixels on tiny
random-weight files in the released formats (guided-diffusion's UNet and 256 classifier layouts, an image folder, an
ADM reference batch). Missing inputs and mismatched sizes stop the run before any compute."""

from pathlib import Path

import numpy as np
import pytest
import torch
from imagenet_fixtures import CLASSES, Smoke, seeded, write_images_and_reference
from netutils import randomized_zeros
from omegaconf import OmegaConf

from dg_lightning import checkpoints
from dg_lightning.ddpm import DDPMSchedule, ddpm_sampler
from dg_lightning.seeds import SampleNoise
from dg_lightning.guidance import ClassifierGuidance, DiscriminatorGuidance
from dg_lightning.pipelines.imagenet_adm import adm_sample_fn
from dg_lightning.nets import adm, unet
from dg_lightning.sources import shard_source

SMOKE = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "smoke" / "imagenet_adm.yaml")
SIZE = SMOKE.data.image_size
PIPELINE = Smoke("imagenet_adm_g++", "imagenet_adm", SIZE, SMOKE.metrics.num_samples)


def tiny_unet():
    """The smoke's UNet; its zero-initialised output layer gets small weights, so the learned-range v stays near
    [-1, 1] (larger |v| extrapolates the variance far beyond beta and the samples blow up)."""
    return randomized_zeros(seeded(lambda: unet.adm256_cond(**SMOKE.score.overrides)), scale=0.02)


def tiny_classifier():
    """The smoke's classifier layout (see conf/smoke/imagenet_adm.yaml), saved as 256x256_classifier.pt."""
    spec = checkpoints.ADM_CLASSIFIERS[SMOKE.discriminator.classifier.config]
    return randomized_zeros(seeded(lambda: spec.build(**SMOKE.discriminator.classifier.overrides)), seed=2)


def write_released_files(folder):
    """The tiny released files under their released names, a class-folder image set of odd sizes and a reference batch."""
    folder.mkdir(exist_ok=True)
    torch.save(tiny_unet().state_dict(), folder / "256x256_diffusion.pt")
    torch.save(tiny_classifier().state_dict(), folder / "256x256_classifier.pt")
    write_images_and_reference(folder, height=(40, 8), width=(32, 20), reference_size=SIZE)
    return folder


@pytest.mark.slow
def test_smoke_runs_every_stage_in_pixel_space_and_dg_weight_zero_is_adm_g(tmp_path):
    released = write_released_files(tmp_path / "released")
    _, metrics = PIPELINE.run_every_stage(tmp_path, released)

    # Real images are stored as uint8 centre crops (no autoencoder), fakes as uint8 ADM-G images; both are read in
    # place from the shards (no copy beside them).
    (real,) = PIPELINE.cache(tmp_path, "encode")
    shard = np.load(real / "shard-000000.npz")
    assert shard["samples"].dtype == np.uint8 and shard["samples"].shape == (4 * len(CLASSES), SIZE, SIZE, 3)
    source = shard_source(real)
    assert np.array_equal(source.samples[:], shard["samples"])
    assert np.array_equal(source.labels.numpy(), np.repeat(np.arange(len(CLASSES)), 4))
    (fakes,) = PIPELINE.cache(tmp_path, "generate")
    shard = np.load(fakes / "shard-000000.npz")
    assert shard["samples"].dtype == np.uint8 and shard["samples"].shape == (SMOKE.data.num_fake + SMOKE.data.num_held_out, SIZE, SIZE, 3)
    assert np.array_equal(shard_source(fakes).samples[:], shard["samples"])
    assert not any((folder / "samples.npy").exists() for folder in (real, fakes))

    # DG weight 0: ADM-G++ is exactly ADM-G with the same CG schedule, reusing the crops, fakes and head.
    PIPELINE.check_dg_weight_zero_is_the_baseline(tmp_path, released, metrics)


def test_sampler_wiring_matches_ddpm_sampler_with_the_table_d1_schedules(tmp_path, compose_cfg):
    cfg = compose_cfg(*PIPELINE.overrides(tmp_path, "sampler.schedule.respacing=4"))  # k = 999, 666 (CG 0.75) and 333, 0 (CG 1.5)
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
    baseline_fn = adm_sample_fn(cfg, model, classifier)
    baseline = baseline_fn(latents, labels, SampleNoise([5, 6]))
    assert torch.equal(baseline, expected(**schedules)) and baseline_fn.nfe == [4]  # one UNet call per respaced step
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
    PIPELINE.check_stops_before_any_compute(tmp_path, compose_cfg, released,
                                            rf"config key '{key}': .*{remove} does not exist.*download it from")


@pytest.mark.parametrize("settings, match", [
    (["sampler.cg_scale=-1"], r"config key 'sampler.cg_scale'"),
    (["guidance.dg.boost=0"], r"config key 'guidance.dg.boost'"),
    (["data.image_size=64"], r"config key 'score.checkpoint': .* on 32x32 images but data.image_size is 64"),
    (["data.image_size=64", "score.overrides.image_size=64"],
     r"config key 'discriminator.classifier.path': .* on 32x32 images but data.image_size is 64"),
])
def test_bad_settings_stop_the_run_before_any_file_is_read(tmp_path, compose_cfg, settings, match):
    released = write_released_files(tmp_path / "released")
    for name in ("256x256_diffusion.pt", "256x256_classifier.pt"):  # sizes come from the config, not the files
        (released / name).write_bytes(b"not read")
    PIPELINE.check_stops_before_any_compute(tmp_path, compose_cfg, released, match, *settings)


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
