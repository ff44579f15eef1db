"""EDM-G++ and Soft Truncation-G++ (pipeline=edm) through the real entry point with +smoke=edm / +smoke=st, on tiny
random-weight files written here in the released formats: an EDM network pickle or a Soft Truncation checkpoint, an ADM
classifier and DG head state dicts, the authors' true_data*.npz, EDM's dataset zip or a folder of CelebA-sized photos,
and an FID reference npz. Missing files stop the run before any compute."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from netutils import randomized_zeros, write_soft_truncation_checkpoint
from PIL import Image
from omegaconf import OmegaConf
from test_checkpoints import write_edm_pickle  # noqa: F401  (fixture: EDM-format pickles)
from test_run import run_py
from test_sources import write_edm_zip

from dg_lightning import checkpoints
from dg_lightning.config import ConfigError
from dg_lightning.nets import adm, edm, ncsnpp
from dg_lightning.pipelines import run
from dg_lightning.sources import center_crop_resize

SMOKES = Path(__file__).resolve().parents[1] / "conf" / "smoke"
SMOKE, SMOKE_ST = OmegaConf.load(SMOKES / "released.yaml"), OmegaConf.load(SMOKES / "st.yaml")
SMOKE_EDM = OmegaConf.load(SMOKES / "edm.yaml")
# experiment: (score network file, resolution, label_dim, ADM classifier config, classifier file, real data file, FID
# reference)
EXPERIMENTS = {
    "cifar10_edm_g++": ("edm-cifar10-32x32-uncond-vp.pkl", 32, 0, "cifar10", "32x32_classifier.pt", "true_data.npz",
                        "cifar10-32x32.npz"),
    "cifar10_cond_edm_g++": ("edm-cifar10-32x32-cond-vp.pkl", 32, 10, "cifar10", "32x32_classifier.pt",
                             "true_data_label.npz", "cifar10-32x32.npz"),
    "ffhq64_edm_g++": ("edm-ffhq-64x64-uncond-vp.pkl", 64, 0, "adm64", "64x64_classifier.pt", "ffhq-64x64.zip",
                       "ffhq-64x64.npz"),
    "celeba64_st_g++": ("soft-truncation-celeba64-ddpmpp-fid.pth", 64, 0, "adm64", "64x64_classifier.pt",
                        "img_align_celeba", "celeba-64x64.npz"),
}
NUM_REAL = 40


def smoke(experiment):
    """The experiment's smoke overlay: +smoke=st for Soft Truncation-G++, +smoke=edm for the EDM rows."""
    return "+smoke=st" if experiment.startswith("celeba") else "+smoke=edm"


def write_released_files(folder, experiment, write_edm_pickle, num_real=NUM_REAL):  # noqa: F811
    """The experiment's released files, tiny and with random weights, in `folder` under their released names, with
    num_real real images."""
    score_name, resolution, label_dim, classifier, classifier_name, data_name, reference_name = EXPERIMENTS[experiment]
    folder.mkdir(exist_ok=True)
    if score_name.endswith(".pth"):  # Soft Truncation's checkpoint layout, its tiny network of +smoke=st
        net = randomized_zeros(ncsnpp.celeba64(**OmegaConf.to_container(SMOKE_ST.score.overrides)))
        write_soft_truncation_checkpoint(folder / score_name, net)
    else:
        kwargs = dict(img_resolution=resolution, img_channels=3, label_dim=label_dim, model_type="SongUNet",
                      model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0)
        write_edm_pickle(folder / score_name, randomized_zeros(edm.EDMPrecond(**kwargs)), kwargs)
    overrides = OmegaConf.to_container(SMOKE.discriminator.classifier.overrides)
    torch.save(randomized_zeros(checkpoints.ADM_CLASSIFIERS[classifier].build(**overrides)).state_dict(),
               folder / classifier_name)
    images = np.random.default_rng(0).integers(0, 256, (num_real, resolution, resolution, 3), dtype=np.uint8)
    labels = np.arange(num_real) % 10
    if data_name == "true_data.npz":
        np.savez(folder / data_name, images)
    elif data_name == "true_data_label.npz":
        np.savez(folder / data_name, samples=images, label=labels)
    elif data_name == "img_align_celeba":  # full-size aligned photos (218 x 178), cropped and resized as they are read
        photos = np.random.default_rng(0).integers(0, 256, (num_real, 218, 178, 3), dtype=np.uint8)
        (folder / data_name).mkdir(exist_ok=True)
        for i, photo in enumerate(photos):
            Image.fromarray(photo).save(folder / data_name / f"{i + 1:06d}.png")
        images = np.stack([center_crop_resize(photo, 140, resolution) for photo in photos])
    else:
        write_edm_zip(folder / data_name, images)
    features = instantiate(SMOKE.metrics.feature_net)
    with torch.no_grad():
        real = features(torch.from_numpy(images).permute(0, 3, 1, 2)).double().numpy()
    np.savez(folder / reference_name, mu=real.mean(0), sigma=np.cov(real, rowvar=False))
    return folder


def released_head(folder, num_classes):
    """A released-format DG head (discriminator_60.pt / discriminator_250.pt layout) on the tiny classifier's features."""
    path = folder / ("discriminator_250.pt" if num_classes else "discriminator_60.pt")
    torch.save(randomized_zeros(adm.dg_head(SMOKE.discriminator.head.in_channels, num_classes), seed=1).state_dict(), path)
    return path


def cache(tmp_path, experiment, stage):
    return sorted((tmp_path / "logs" / "cache" / experiment).glob(f"{stage}-*"))


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_smoke_runs_every_stage_and_caches_them(tmp_path, write_edm_pickle, experiment):  # noqa: F811
    released = write_released_files(tmp_path / "released", experiment, write_edm_pickle)
    _, resolution, label_dim, *_ = EXPERIMENTS[experiment]
    run_py(tmp_path, f"experiment={experiment}", smoke(experiment), f"paths.released_dir={released}")

    (run_dir,) = (tmp_path / "logs" / experiment / "runs").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    scores = ("fid", "precision", "recall", "nfe")
    assert set(metrics) == {f"{p}/{k}" for p in ("eval", "eval_unguided") for k in scores} | {
        "sampling/best_epoch", "sampling/best_fid"}
    assert all(np.isfinite(v) for v in metrics.values())
    for nfe in (metrics["eval/nfe"], metrics["eval_unguided/nfe"]):  # score-model evaluations per sample (DG's
        if experiment.startswith("celeba"):                            # discriminator is no score-model call)
            assert nfe >= 2 + 6 + 1 and (nfe - 3) % 6 == 0  # RK45: 2 to start, 6 per tried step, 1 to denoise
        else:
            assert nfe == 2 * SMOKE_EDM.sampler.num_steps - 1 == 5  # EDM's Heun with 3 steps
    assert all(0 <= metrics[f"{p}/{k}"] <= 1 for p in ("eval", "eval_unguided") for k in ("precision", "recall"))
    assert metrics["eval/fid"] != metrics["eval_unguided/fid"]  # DG changed the samples
    # The guided-sampling callback (callbacks.sampling, every epoch in the smoke overlay) scored epoch 0 with the
    # experiment's metrics and logged them, drew its grid and kept the best epoch's head.
    (logged,) = [row for row in csv.DictReader((run_dir / "csv" / "metrics.csv").open()) if row.get("sampling/fid")]
    assert int(logged["epoch"]) == metrics["sampling/best_epoch"] == 0
    assert float(logged["sampling/fid"]) == pytest.approx(metrics["sampling/best_fid"], rel=1e-6)
    assert 0 <= float(logged["sampling/precision"]) <= 1 and 0 <= float(logged["sampling/recall"]) <= 1

    # Stage outputs: fakes (labelled when conditional), the trained head, per-epoch checkpoints without the frozen
    # feature extractor, the unguided evaluation samples.
    (fakes,) = cache(tmp_path, experiment, "generate")
    shard = np.load(fakes / "shard-000000.npz")
    assert shard["samples"].shape == (SMOKE.data.num_fake + SMOKE.data.num_held_out, resolution, resolution, 3)
    assert ("labels" in shard) == bool(label_dim)
    if label_dim:
        assert 0 <= shard["labels"].min() and shard["labels"].max() < label_dim and len(set(shard["labels"])) > 1
    (train,) = cache(tmp_path, experiment, "train")
    held_out = json.loads((train / "held_out.json").read_text())["epochs"]  # the held-out diagnostics' figures
    assert [e["epoch"] for e in held_out] == [0] and sum(held_out[0]["count"]) == 2 * SMOKE.data.num_held_out
    weights = torch.load(train / "discriminator.pt", weights_only=True)
    checkpoint = torch.load(train / "checkpoints" / "epoch000.ckpt", weights_only=True)
    head_keys = {f"discriminator.{k}" for k in weights if k.startswith("head.")}
    assert set(checkpoint["state_dict"]) == head_keys
    assert all(torch.equal(checkpoint["state_dict"][f"discriminator.{k}"], v) for k, v in weights.items()
               if k.startswith("head."))
    (unguided,) = cache(tmp_path, experiment, "sample_unguided")
    assert np.load(unguided / "shard-000000.npz")["samples"].shape[0] == SMOKE.metrics.num_samples

    # A DG weight of 0 samples exactly the unguided sets, reusing the fakes and the trained head (through run.py too:
    # pytest runs one torch thread, and another thread count could flip a last bit and then a uint8 level).
    run_py(tmp_path, f"experiment={experiment}", smoke(experiment), f"paths.released_dir={released}",
           "guidance.dg.weight=0")
    (zero_dir,) = set((tmp_path / "logs" / experiment / "runs").iterdir()) - {run_dir}
    zero = json.loads((zero_dir / "metrics.json").read_text())
    assert zero["eval/fid"] == zero["eval_unguided/fid"] == metrics["eval_unguided/fid"]
    assert len(cache(tmp_path, experiment, "generate")) == len(cache(tmp_path, experiment, "train")) == 1
    assert (train / "sampling" / "samples_epoch0.png").is_file()
    if experiment == "cifar10_edm_g++":
        # select=best trains a head of its own (the pick depends on the guidance) and, with one epoch, guides with the
        # weights of select=last.
        run_py(tmp_path, f"experiment={experiment}", "+smoke=edm", f"paths.released_dir={released}",
               "discriminator.select=best")
        (best_dir,) = set((tmp_path / "logs" / experiment / "runs").iterdir()) - {run_dir, zero_dir}
        best = json.loads((best_dir / "metrics.json").read_text())
        assert best["eval/fid"] == metrics["eval/fid"] and len(cache(tmp_path, experiment, "train")) == 2
        # Its cached head serves another evaluation: the best epoch's weights and record come from the stage folder.
        run_py(tmp_path, f"experiment={experiment}", "+smoke=edm", f"paths.released_dir={released}",
               "discriminator.select=best", "metrics.num_samples=6")
        (cached_dir,) = set((tmp_path / "logs" / experiment / "runs").iterdir()) - {run_dir, zero_dir, best_dir}
        cached = json.loads((cached_dir / "metrics.json").read_text())
        assert cached["sampling/best_epoch"] == 0 and np.isfinite(cached["eval/fid"])
        assert len(cache(tmp_path, experiment, "train")) == 2


@pytest.mark.parametrize("experiment", ["cifar10_edm_g++", "cifar10_cond_edm_g++"])
def test_released_head_guides_as_it_is_without_fakes_or_training(tmp_path, compose_cfg, write_edm_pickle, experiment):  # noqa: F811
    released = write_released_files(tmp_path / "released", experiment, write_edm_pickle)
    head = released_head(released, 1000 if "cond" in experiment else None)
    metrics = run(compose_cfg(f"experiment={experiment}", "+smoke=edm", f"paths.released_dir={released}", "logger=csv",
                              f"discriminator.head_path={head}", "trainer.max_epochs=0", "data.path=null"))
    assert set(metrics) == {"eval/fid", "eval_unguided/fid", "eval/nfe", "eval_unguided/nfe"}  # no real images: FID
    assert metrics["eval/nfe"] == metrics["eval_unguided/nfe"] == 5  # against the reference only; Heun, 3 steps
    assert np.isfinite(metrics["eval/fid"]) and metrics["eval/fid"] != metrics["eval_unguided/fid"]
    assert not cache(tmp_path, experiment, "generate") and not cache(tmp_path, experiment, "train")


@pytest.mark.parametrize("key, missing, source", [
    ("score.checkpoint", "edm-cifar10-32x32-uncond-vp.pkl", "nvlabs-fi-cdn.nvidia.com/edm/pretrained"),
    ("discriminator.classifier.path", "32x32_classifier.pt", "github.com/alsdudrla10/DG"),
    ("metrics.fid_reference", "cifar10-32x32.npz", "nvlabs-fi-cdn.nvidia.com/edm/fid-refs"),
])
def test_a_missing_released_file_names_its_key_file_and_source(tmp_path, compose_cfg, write_edm_pickle, key, missing,  # noqa: F811
                                                               source):
    released = write_released_files(tmp_path / "released", "cifar10_edm_g++", write_edm_pickle)
    (released / missing).unlink()
    with pytest.raises(ConfigError, match=rf"config key '{key}': the file .*{missing} does not exist.*{source}"):
        run(compose_cfg("experiment=cifar10_edm_g++", "+smoke=edm", f"paths.released_dir={released}", "logger=csv"))
    assert not (tmp_path / "logs" / "cache").exists()  # stopped before any stage


def test_fid_reference_statistics_without_mu_and_sigma_are_refused_before_any_stage(tmp_path, compose_cfg,  # noqa: F811
                                                                                   write_edm_pickle):
    released = write_released_files(tmp_path / "released", "cifar10_edm_g++", write_edm_pickle)
    np.savez(released / "cifar10-32x32.npz", mean=np.zeros(48), cov=np.eye(48))  # another tool's names
    with pytest.raises(ConfigError, match=r"config key 'metrics.fid_reference': .*cifar10-32x32.npz lacks the arrays "
                                          r"\['mu', 'sigma'\] \(it has \['cov', 'mean'\]\). Fix: give an .npz with the "
                                          r"arrays \['mu', 'sigma'\], e.g. the one from https://nvlabs-fi-cdn"):
        run(compose_cfg("experiment=cifar10_edm_g++", "+smoke=edm", f"paths.released_dir={released}", "logger=csv"))
    assert not (tmp_path / "logs" / "cache").exists()


def test_more_real_images_than_the_data_holds_is_refused_naming_data_num_real(tmp_path, compose_cfg,  # noqa: F811
                                                                             write_edm_pickle):
    released = write_released_files(tmp_path / "released", "cifar10_edm_g++", write_edm_pickle)
    with np.load(released / "true_data.npz") as npz:
        held = len(npz["arr_0"])
    with pytest.raises(ConfigError, match=rf"config key 'data.num_real': asks for 1000 samples but .*true_data.npz holds "
                                          rf"only {held}. Fix: set data.num_real={held} or fewer, or data.num_real=null"):
        run(compose_cfg("experiment=cifar10_edm_g++", "+smoke=edm", f"paths.released_dir={released}", "logger=csv",
                        "data.num_real=1000"))
    assert not cache(tmp_path, "cifar10_edm_g++", "generate")


def test_without_smoke_the_inception_weights_are_required(tmp_path, compose_cfg, write_edm_pickle):  # noqa: F811
    released = write_released_files(tmp_path / "released", "cifar10_edm_g++", write_edm_pickle)
    with pytest.raises(ConfigError, match=r"'metrics.inception_path': .*weights-inception-2015-12-05-6726825d.pth does "
                                          r"not exist. Fix: download https://github.com/toshas"):
        run(compose_cfg("experiment=cifar10_edm_g++", f"paths.released_dir={released}", "logger=csv"))


@pytest.mark.parametrize("overrides, key", [
    (["trainer.max_epochs=0"], "trainer.max_epochs"),
    (["data.path=null"], "data.path"),
    (["discriminator.conditional=true"], "discriminator.head.num_classes"),
    (["discriminator.classifier.config=imagenet"], "discriminator.classifier.config"),
    (["discriminator.conditional=true", "discriminator.head.num_classes=1000"], "discriminator.conditional"),
    (["discriminator.classifier.config=adm64", "discriminator.head_path=null"], "discriminator.classifier.config"),
])
def test_inconsistent_settings_are_refused_before_sampling(tmp_path, compose_cfg, write_edm_pickle, overrides, key):  # noqa: F811
    released = write_released_files(tmp_path / "released", "cifar10_edm_g++", write_edm_pickle)
    if "discriminator.classifier.config=adm64" in overrides:  # a 64x64 classifier file next to a 32x32 score network
        write_released_files(tmp_path / "released", "ffhq64_edm_g++", write_edm_pickle)
        overrides = [*overrides, f"discriminator.classifier.path={released / '64x64_classifier.pt'}"]
    with pytest.raises(ConfigError, match=rf"config key '{key}'"):
        run(compose_cfg("experiment=cifar10_edm_g++", "+smoke=edm", f"paths.released_dir={released}", "logger=csv",
                        *overrides))
    assert not cache(tmp_path, "cifar10_edm_g++", "generate")


@pytest.mark.parametrize("num_real", [16, "null"])
def test_holding_out_every_real_image_is_refused_naming_data_num_held_out(tmp_path, compose_cfg,  # noqa: F811
                                                                          write_edm_pickle, num_real):
    """From the config alone (data.num_real given) or from the data (null: all it holds), before any fake is made."""
    released = write_released_files(tmp_path / "released", "cifar10_edm_g++", write_edm_pickle)
    with np.load(released / "true_data.npz") as npz:
        held = 16 if num_real == 16 else len(npz["arr_0"])
    with pytest.raises(ConfigError, match=rf"config key 'data.num_held_out': holds out {held} of the {held} real "
                                          rf"samples of .*true_data.npz .*Fix: set data.num_held_out below {held}"):
        run(compose_cfg("experiment=cifar10_edm_g++", "+smoke=edm", f"paths.released_dir={released}", "logger=csv",
                        f"data.num_real={num_real}", f"data.num_held_out={held}"))
    assert not cache(tmp_path, "cifar10_edm_g++", "generate")
