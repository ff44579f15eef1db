"""DiT-XL/2-G++ (pipeline=imagenet) through the real entry point with +smoke=imagenet, on tiny random-weight files in
the released formats (a DiT state dict, the latent ADM classifier, an image folder, an ADM reference batch) and the
stand-in autoencoder of tests/standin_vae.py. Missing or empty inputs stop the run before any compute; a missing latent
classifier is trained first (discriminator.classifier.train_if_missing)."""

import json
from pathlib import Path

import numpy as np
import pytest
import standin_vae
import torch
from imagenet_fixtures import CLASSES, Smoke, seeded, write_images_and_reference
from netutils import randomized_zeros
from omegaconf import OmegaConf

from dg_lightning import checkpoints
from dg_lightning.config import ConfigError
from dg_lightning.ddpm import DDPMSchedule, ddpm_sampler
from dg_lightning.seeds import SampleNoise
from dg_lightning.guidance import DiscriminatorGuidance
from dg_lightning.pipelines.imagenet_dit import dit_sample_fn
from dg_lightning.nets import dit as dit_nets
from dg_lightning.pipelines import run

TESTS = Path(__file__).resolve().parent
SMOKE = OmegaConf.load(TESTS.parent / "conf" / "smoke" / "imagenet.yaml")
STANDIN = ("score.vae._target_=standin_vae.load", "data.vae._target_=standin_vae.load")
PIPELINE = Smoke("imagenet_dit_g++", "imagenet", 256, SMOKE.metrics.num_samples, STANDIN)


def tiny_dit():
    return randomized_zeros(seeded(lambda: dit_nets.DiT(input_size=32, num_classes=1000, **SMOKE.score.overrides)))


def write_released_files(folder):
    """The tiny released files under their released names, plus a class-folder image set of odd sizes."""
    folder.mkdir(exist_ok=True)
    torch.save(tiny_dit().state_dict(), folder / "DiT-XL-2-256x256.pt")
    classifier = seeded(lambda: checkpoints.ADM_CLASSIFIERS["latent"].build(**SMOKE.discriminator.classifier.overrides))
    torch.save(randomized_zeros(classifier).state_dict(), folder / "32x32_classifier.pt")
    standin_vae.write(folder / "sd-vae-ft-mse", seed=0)
    standin_vae.write(folder / "sd-vae-ft-ema", seed=1)
    write_images_and_reference(folder, height=(200, 40), width=(256, 100), reference_size=256)
    return folder


@pytest.mark.slow
def test_smoke_runs_every_stage_exports_and_dg_weight_zero_is_unguided(tmp_path, monkeypatch):
    released = write_released_files(tmp_path / "released")
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    _, metrics = PIPELINE.run_every_stage(tmp_path, released)

    # Stage outputs: real latents labelled by class folder, fakes as latents with labels.
    (real,) = PIPELINE.cache(tmp_path, "encode")
    shard = np.load(real / "shard-000000.npz")
    assert shard["samples"].dtype == np.float32 and shard["samples"].shape == (4 * len(CLASSES), 4, 32, 32)
    assert np.array_equal(shard["labels"], np.repeat(np.arange(len(CLASSES)), 4))
    (fakes,) = PIPELINE.cache(tmp_path, "generate")
    shard = np.load(fakes / "shard-000000.npz")
    assert shard["samples"].shape == (SMOKE.data.num_fake + SMOKE.data.num_held_out, 4, 32, 32) and len(set(shard["labels"])) > 1
    # Fakes and the encoding draw above every configured seed (the evaluation samples draw at sampling_seed 0).
    manifests = [json.loads((folder / "manifest.json").read_text()) for folder in (fakes, real)]
    assert [m["base_seed"] for m in manifests] == [2**32, 2 * 2**32]  # seed 0

    # A DG weight of 0 gives exactly the unguided samples and metrics, reusing the latents, fakes and head.
    PIPELINE.check_dg_weight_zero_is_the_baseline(tmp_path, released, metrics)


def test_sampler_wiring_matches_ddpm_sampler_with_the_dit_g_plus_plus_schedule(tmp_path, compose_cfg):
    cfg = compose_cfg(*PIPELINE.overrides(tmp_path, "sampler.schedule.respacing=25"))
    net = tiny_dit().eval()
    discriminator = checkpoints.adm.Discriminator(
        randomized_zeros(checkpoints.ADM_CLASSIFIERS["latent"].build(**cfg.discriminator.classifier.overrides)),
        randomized_zeros(checkpoints.adm.dg_head(96, 1000), seed=1))
    latents, labels = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 999])
    schedule = DDPMSchedule(1000, "25")

    def expected(**kwargs):
        with torch.no_grad():
            return ddpm_sampler(net, latents, labels, schedule, null_label=1000, guided_channels=3,
                                randn_like=SampleNoise([5, 6]).randn_like, **kwargs)

    fakes = dit_sample_fn(cfg, net, fake_cfg_scale=1.5)(latents, labels, SampleNoise([5, 6]))
    assert torch.equal(fakes, expected(cfg_scale=1.5))
    guided = dit_sample_fn(cfg, net, discriminator)(latents, labels, SampleNoise([5, 6]))
    dg = DiscriminatorGuidance(discriminator, t_min=0.01, t_max=1.0, clip=1e-5)
    reference = expected(cfg_scale=1.25, cfg_scale_late=3.0, cfg_switch_step=200, dg=dg, dg_weight=1.0,
                         dg_switch_step=100)
    assert torch.allclose(guided, reference, atol=1e-5)
    assert not torch.allclose(guided, expected(cfg_scale=1.25, cfg_scale_late=3.0, cfg_switch_step=200), atol=1e-3)
    assert not torch.allclose(fakes, expected(cfg_scale=1.25, cfg_scale_late=3.0, cfg_switch_step=200), atol=1e-3)


@pytest.mark.parametrize("remove, key, more", [
    ("DiT-XL-2-256x256.pt", "score.checkpoint", []),
    ("32x32_classifier.pt", "discriminator.classifier.path", ["discriminator.classifier.train_if_missing=false"]),
    ("VIRTUAL_imagenet256_labeled.npz", "metrics.reference_batch", []),
    ("sd-vae-ft-mse", "score.vae.path", []),
])
def test_a_missing_released_file_stops_the_run_before_any_compute(tmp_path, compose_cfg, remove, key, more):
    released = write_released_files(tmp_path / "released")
    path = released / remove
    if path.is_dir():
        (path / "standin.pt").unlink()
        path.rmdir()
    else:
        path.unlink()
    PIPELINE.check_stops_before_any_compute(tmp_path, compose_cfg, released,
                                            rf"config key '{key}': .*{remove} does not exist.*download it from", *more)


def test_a_reference_batch_without_its_sfid_statistics_stops_the_run_before_any_compute(tmp_path, compose_cfg):
    released = write_released_files(tmp_path / "released")
    reference = released / "VIRTUAL_imagenet256_labeled.npz"
    with np.load(reference) as npz:
        np.savez(reference, **{k: npz[k] for k in ("arr_0", "mu", "sigma")})
    PIPELINE.check_stops_before_any_compute(tmp_path, compose_cfg, released,
                                            r"config key 'metrics.reference_batch': .*VIRTUAL_imagenet256_labeled.npz "
                                            r"lacks the arrays \['mu_s', 'sigma_s'\] \(it has \['arr_0', 'mu', 'sigma'\]\)."
                                            r" Fix: give an .npz with the arrays \['arr_0', 'mu', 'sigma', 'mu_s', "
                                            r"'sigma_s'\], e.g. the one from https://openaipublic")


def released_with_image_count(tmp_path):
    """(the released files' folder, the number of images in its ImageNet train folder)."""
    released = write_released_files(tmp_path / "released")
    return released, len(list((released / "imagenet" / "train").rglob("*.JPEG")))


def test_more_real_images_than_the_image_folder_holds_stops_the_run_before_any_compute(tmp_path, compose_cfg):
    released, held = released_with_image_count(tmp_path)
    PIPELINE.check_stops_before_any_compute(tmp_path, compose_cfg, released,
                                            rf"config key 'data.num_real': asks for 1000000 samples but .*imagenet/train "
                                            rf"holds only {held}. Fix: set data.num_real={held} or fewer",
                                            "data.num_real=1000000")


def test_holding_out_every_real_image_stops_the_run_before_any_compute(tmp_path, compose_cfg):
    released, held = released_with_image_count(tmp_path)
    PIPELINE.check_stops_before_any_compute(tmp_path, compose_cfg, released,
                                            rf"config key 'data.num_held_out': holds out {held} of the {held} real "
                                            rf"samples of .*imagenet/train .*Fix: set data.num_held_out below {held}",
                                            f"data.num_held_out={held}")


def test_an_empty_image_folder_stops_the_run_before_any_compute(tmp_path, compose_cfg):
    released = write_released_files(tmp_path / "released")
    for image in (released / "imagenet" / "train").rglob("*.JPEG"):
        image.unlink()
    PIPELINE.check_stops_before_any_compute(tmp_path, compose_cfg, released,
                                            r"config key 'data.image_dir': .*n01440764: class folder with no "
                                            r"\.png/\.jpg/\.jpeg files.*Fix: point it at ImageNet's train folder")


def test_a_missing_latent_classifier_is_trained_on_the_real_latents_and_used_by_the_head(tmp_path, compose_cfg):
    released = write_released_files(tmp_path / "released")
    (released / "32x32_classifier.pt").unlink()
    run(compose_cfg(*PIPELINE.overrides(released, "logger=csv", "stage=train")))
    (folder,) = PIPELINE.cache(tmp_path, "pretrain_classifier")
    weights = torch.load(folder / "classifier.pt", weights_only=True)
    trained = checkpoints.load_adm_classifier(folder / "classifier.pt", "latent", **SMOKE.discriminator.classifier.overrides)
    torch.manual_seed(0)  # the stage's initialisation: build_network seeds with cfg.seed = 0
    fresh = checkpoints.ADM_CLASSIFIERS["latent"].build(**SMOKE.discriminator.classifier.overrides).state_dict()
    assert not torch.equal(weights["input_blocks.0.0.weight"], fresh["input_blocks.0.0.weight"])  # trained
    assert trained.feature_channels == SMOKE.discriminator.head.in_channels

    # The head was trained on the features of exactly that classifier, read from the stage's file.
    (train,) = PIPELINE.cache(tmp_path, "train")
    discriminator = torch.load(train / "discriminator.pt", weights_only=True)
    assert all(torch.equal(discriminator[f"feature_extractor.{k}"], v) for k, v in weights.items())
    assert not PIPELINE.cache(tmp_path, "sample_dg")

    # A released head cannot sit on a classifier trained here.
    head = released / "discriminator_7.pt"
    torch.save(randomized_zeros(checkpoints.adm.dg_head(96, 1000), seed=1).state_dict(), head)
    with pytest.raises(ConfigError, match=r"config key 'discriminator.classifier.path': .*trained on the released "
                                          r"classifier's features"):
        run(compose_cfg(*PIPELINE.overrides(released, "logger=csv", f"discriminator.head_path={head}")))


def test_guiding_with_a_released_head_needs_no_images_fakes_or_training(tmp_path, compose_cfg):
    released = write_released_files(tmp_path / "released")
    head = released / "discriminator_7.pt"
    torch.save(randomized_zeros(checkpoints.adm.dg_head(96, 1000), seed=1).state_dict(), head)
    metrics = run(compose_cfg(*PIPELINE.overrides(released, "logger=csv", f"discriminator.head_path={head}",
                                         "trainer.max_epochs=0", "data.image_dir=null", "data.vae.path=null")))
    assert np.isfinite(metrics["eval/fid"]) and metrics["eval/fid"] != metrics["eval_unguided/fid"]
    assert metrics["eval/nfe"] == metrics["eval_unguided/nfe"] == 10  # one DiT call per step (CFG in one batch), respacing 10
    assert not any(PIPELINE.cache(tmp_path, stage) for stage in ("encode", "generate", "train"))


def test_load_dit_is_strict_and_names_the_file_and_architecture(tmp_path):
    net = tiny_dit()
    path = tmp_path / "dit.pt"
    torch.save(net.state_dict(), path)
    loaded = checkpoints.load_dit(path, None, 32, 1000, **SMOKE.score.overrides)
    x, t, y = torch.randn(2, 4, 32, 32), torch.tensor([10.0, 900.0]), torch.tensor([1, 1000])
    assert torch.equal(loaded(x, t, y), net(x, t, y)) and not loaded.training
    with pytest.raises(checkpoints.CheckpointError, match=r"dit.pt does not match DiT-S/8\(input_size=32, num_classes=1000"):
        checkpoints.load_dit(path, "DiT-S/8", 32, 1000)
    with pytest.raises(FileNotFoundError, match=r"DiT-XL-2-256x256.pt"):
        checkpoints.load_dit(tmp_path / "missing.pt")
