"""Checkpoint loaders: EDM network pickles read without running code
from the file; ADM classifiers and DG heads as strict state dicts. Every file is written here, in tmp_path."""

import dataclasses
import pickle
import re
import sys

import netutils
import pytest
import test_lsgm
import torch
from netutils import randomized, randomized_zeros, write_lsgm_checkpoint
from payloads import EXPLOITS, Exploit

from dg_lightning import checkpoints
from dg_lightning.checkpoints import (
    CheckpointError,
    ForbiddenGlobalError,
    load_adm_classifier,
    load_dg_discriminator,
    load_edm,
    load_lsgm,
)
from dg_lightning.nets import adm, edm, nvae
from dg_lightning.sde import cosine_time_from_tau

# --- writing EDM-format pickles ---


@pytest.fixture
def write_edm_pickle(monkeypatch):
    """write(path, net, init_kwargs, **entries): netutils.write_edm_pickle, whose pickle's reconstruct global resolves,
    while the test runs, to a function that records its calls in write.calls."""
    calls = []
    modules = netutils.edm_persistence(calls)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)

    def write(path, net, init_kwargs, version=6, **entries):
        return netutils.write_edm_pickle(path, net, init_kwargs, version, modules=modules, **entries)

    write.calls = calls
    return write




# Tiny networks for 8x8 grey images; the arguments differ from the constructors' defaults, so a loader that
# ignored the recorded kwargs would build another network.
TINY = dict(img_resolution=8, img_channels=1, model_channels=16, channel_mult=[1, 2], num_blocks=1,
            attn_resolutions=[4], dropout=0.0)
NCSNPP = dict(embedding_type="fourier", channel_mult_noise=2, encoder_type="residual", resample_filter=[1, 3, 3, 1])
EDM_CASES = {
    "vp-ddpm++-cond": (edm.VPPrecond, dict(TINY, model_type="SongUNet", label_dim=3, augment_dim=9)),
    "ve-ncsn++": (edm.VEPrecond, dict(TINY, model_type="SongUNet", **NCSNPP)),
    "edm-ddpm++": (edm.EDMPrecond, dict(TINY, model_type="SongUNet", sigma_data=0.25)),
    "edm-adm-cond-fp16": (edm.EDMPrecond, dict(TINY, model_type="DhariwalUNet", label_dim=3, use_fp16=True)),
    "iddpm-adm": (edm.iDDPMPrecond, dict(TINY, model_type="DhariwalUNet")),
}


def tiny_edm(case="vp-ddpm++-cond"):
    """(network, its constructor kwargs) of EDM_CASES[case], with random weights."""
    cls, kwargs = EDM_CASES[case]
    return randomized(cls(**kwargs)), kwargs




# --- EDM network pickles ---

@pytest.mark.parametrize("case", EDM_CASES)
def test_load_edm_rebuilds_the_network_with_equal_state_and_outputs(tmp_path, write_edm_pickle, case):
    net, kwargs = tiny_edm(case)
    path = write_edm_pickle(tmp_path / "network.pkl", net, kwargs)

    loaded = load_edm(path)

    assert type(loaded) is type(net) and loaded is not net
    assert write_edm_pickle.calls == []  # the pickle's own reconstruct function never ran
    source_state, loaded_state = net.state_dict(), loaded.state_dict()
    assert list(loaded_state) == list(source_state)
    assert all(torch.equal(loaded_state[k], v) for k, v in source_state.items())
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.05, 3.0])
    labels = torch.eye(3)[[0, 2]] if kwargs.get("label_dim") else None
    with torch.no_grad():
        assert torch.equal(loaded(x, sigma, labels), net.eval()(x, sigma, labels))


@pytest.mark.parametrize("func, code", EXPLOITS)
def test_load_edm_refuses_a_foreign_global_without_running_it(tmp_path, write_edm_pickle, func, code):
    marker = tmp_path / "executed"
    net, kwargs = tiny_edm()
    exploit = Exploit(func, code.format(marker=str(marker)))
    path = write_edm_pickle(tmp_path / "evil.pkl", net, kwargs, augment_pipe=exploit)

    with pytest.raises(ForbiddenGlobalError, match=re.escape(f"{func.__module__}.{func.__name__}")) as info:
        load_edm(path)
    assert isinstance(info.value, pickle.UnpicklingError)
    assert str(path) in str(info.value) and "malicious" in str(info.value)
    assert not marker.exists() and write_edm_pickle.calls == []
    pickle.loads(path.read_bytes())  # the payload is live: a plain unpickler runs it
    assert marker.exists()


def test_load_edm_names_a_missing_file_and_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"absent\.pkl.*nvlabs-fi-cdn\.nvidia\.com/edm/pretrained"):
        load_edm(tmp_path / "absent.pkl")


@pytest.mark.parametrize("corruption", ["truncated", "torch_zip", "text"])
def test_load_edm_rejects_unreadable_files(tmp_path, write_edm_pickle, corruption):
    net, kwargs = tiny_edm()
    path = write_edm_pickle(tmp_path / "network.pkl", net, kwargs)
    if corruption == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif corruption == "torch_zip":
        torch.save(net.state_dict(), path)
    else:
        path.write_text("not a pickle\n")

    with pytest.raises(CheckpointError, match="cannot read .* as an EDM network pickle") as info:
        load_edm(path)
    assert str(path) in str(info.value) and "truncated" in str(info.value)


def test_load_edm_rejects_another_persistence_version(tmp_path, write_edm_pickle):
    net, kwargs = tiny_edm()
    path = write_edm_pickle(tmp_path / "network.pkl", net, kwargs, version=5)
    with pytest.raises(CheckpointError, match=r"unsupported torch_utils.persistence record .*'version': 5"):
        load_edm(path)


@pytest.mark.parametrize("key, match", [
    ("model", r"no network under key 'model' \(found \['augment_pipe', 'dataset_kwargs', 'ema', 'loss_fn'\]\)"),
    ("loss_fn", r"'loss_fn' holds a EDMLoss, which is not one of the supported networks \['EDMPrecond'"),
    ("augment_pipe", r"'augment_pipe' holds a NoneType, not a persistent EDM network"),
    ("dataset_kwargs", r"'dataset_kwargs' holds a dict, not a persistent EDM network"),
])
def test_load_edm_rejects_keys_that_hold_no_network(tmp_path, write_edm_pickle, key, match):
    net, kwargs = tiny_edm()
    path = write_edm_pickle(tmp_path / "network.pkl", net, kwargs)
    with pytest.raises(CheckpointError, match=match) as info:
        load_edm(path, key=key)
    assert str(path) in str(info.value)


def test_load_edm_reports_a_state_that_does_not_fit_the_recorded_arguments(tmp_path, write_edm_pickle):
    net, kwargs = tiny_edm()
    path = write_edm_pickle(tmp_path / "network.pkl", net, dict(kwargs, model_channels=32))
    with pytest.raises(CheckpointError) as info:
        load_edm(path)
    message = str(info.value)
    assert f"{path} does not match VPPrecond(" in message and "'model_channels': 32" in message
    assert "model.map_label.weight [16, 3] in file vs [32, 3] in model" in message
    assert re.search(r"shape mismatches \(\d+\): .*\(and \d+ more\)", message)
    assert len(message.splitlines()) <= 5


def test_load_edm_rejects_arguments_its_class_does_not_take(tmp_path, write_edm_pickle):
    net, kwargs = tiny_edm()
    path = write_edm_pickle(tmp_path / "network.pkl", net, dict(kwargs, model_type="ConvNeXt"))
    with pytest.raises(CheckpointError, match=r"cannot build VPPrecond\(.*'ConvNeXt'.*recorded arguments"):
        load_edm(path)


# --- ADM classifiers and DG heads ---



def tiny_classifier(in_channels):
    """A 16x16 encoder whose 64x8x8 features fit DG's heads (which take 8x8 maps), with 32-channel heads."""
    return adm.EncoderUNet(image_size=16, in_channels=in_channels, model_channels=32, out_channels=5,
                           num_res_blocks=1, attention_resolutions=(2,), channel_mult=(1, 2), num_head_channels=32)


@pytest.fixture
def tiny_classifiers(monkeypatch):
    """ADM_CLASSIFIERS with each released builder replaced by tiny_classifier of its input channels; time maps and
    sources stay. The released layouts themselves are tested in test_released_latent_discriminator_loads_strictly."""
    for name, in_channels in {"cifar10": 3, "latent": 4, "adm64": 3}.items():
        def build(in_channels=in_channels):
            return tiny_classifier(in_channels)

        spec = checkpoints.ADM_CLASSIFIERS[name]
        monkeypatch.setitem(checkpoints.ADM_CLASSIFIERS, name, dataclasses.replace(spec, build=build))


def saved(net, path):
    """torch.save(net.state_dict(), path); returns path."""
    torch.save(net.state_dict(), path)
    return path


def assert_frozen_eval(net):
    assert not net.training and not any(p.requires_grad for p in net.parameters())


@pytest.mark.parametrize("config", ["cifar10", "latent", "adm64"])
def test_load_adm_classifier_loads_strictly(tmp_path, tiny_classifiers, config):
    source = randomized_zeros(checkpoints.ADM_CLASSIFIERS[config].build()).eval()
    loaded = load_adm_classifier(saved(source, tmp_path / "classifier.pt"), config)

    state = loaded.state_dict()
    assert list(state) == list(source.state_dict())
    assert all(torch.equal(state[k], v) for k, v in source.state_dict().items())
    assert_frozen_eval(loaded)
    x, t = torch.randn(2, source.in_channels, 16, 16), torch.tensor([10.0, 700.0])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, features=True), source(x, t, features=True))


def test_load_adm_classifier_takes_every_setting_as_an_override(tmp_path):
    """The released cifar10 builder itself, narrowed by keyword overrides of image_size, channel_mult and
    num_res_blocks as well as of the plain EncoderUNet arguments."""
    overrides = dict(image_size=16, channel_mult=(1, 2), num_res_blocks=1, model_channels=32, num_head_channels=32)
    source = randomized_zeros(adm.cifar10_classifier(**overrides)).eval()
    loaded = load_adm_classifier(saved(source, tmp_path / "classifier.pt"), "cifar10", **overrides)

    assert (loaded.image_size, loaded.feature_channels, loaded.feature_size) == (16, 64, 8)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10.0, 700.0])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, features=True), source(x, t, features=True))


@pytest.mark.parametrize("classifier, num_classes, time_map", [
    ("cifar10", None, None), ("cifar10", 1000, None), ("latent", 1000, None), ("adm64", None, cosine_time_from_tau),
])
def test_load_dg_discriminator_matches_its_source_networks(tmp_path, tiny_classifiers, classifier, num_classes,
                                                           time_map):
    extractor = randomized_zeros(checkpoints.ADM_CLASSIFIERS[classifier].build())
    head = randomized_zeros(adm.dg_head(extractor.feature_channels, num_classes), seed=1)
    reference = adm.Discriminator(extractor, head, time_map).eval()

    loaded = load_dg_discriminator(saved(extractor, tmp_path / "classifier.pt"), saved(head, tmp_path / "head.pt"),
                                   classifier=classifier, num_classes=num_classes)

    assert loaded.time_map is time_map
    assert_frozen_eval(loaded)
    x, tau = torch.randn(2, extractor.in_channels, 16, 16), torch.tensor([0.05, 0.7])
    labels = torch.tensor([3, 999]) if num_classes else None
    with torch.no_grad():
        assert torch.equal(loaded(x, tau, labels), reference(x, tau, labels))


def test_released_latent_discriminator_loads_strictly(tmp_path):
    """The real layouts of DG_imagenet's 32x32_classifier.pt (159 tensors) and discriminator_7.pt (72 tensors)."""
    extractor, head = randomized_zeros(adm.latent_classifier()), randomized_zeros(adm.dg_head(384, num_classes=1000), 1)
    loaded = load_dg_discriminator(saved(extractor, tmp_path / "32x32_classifier.pt"),
                                   saved(head, tmp_path / "discriminator_7.pt"), classifier="latent", num_classes=1000)

    assert (len(loaded.feature_extractor.state_dict()), len(loaded.head.state_dict())) == (159, 72)
    x, tau, labels = torch.randn(1, 4, 32, 32), torch.tensor([0.3]), torch.tensor([207])
    with torch.no_grad():
        assert torch.equal(loaded(x, tau, labels), adm.Discriminator(extractor, head).eval()(x, tau, labels))


def test_head_mismatch_names_the_file_the_architecture_and_the_keys(tmp_path, tiny_classifiers):
    classifier_path = saved(tiny_classifier(3), tmp_path / "classifier.pt")
    head_path = saved(adm.dg_head(64, num_classes=1000), tmp_path / "discriminator_250.pt")
    with pytest.raises(CheckpointError) as info:
        load_dg_discriminator(classifier_path, head_path)  # a conditional head, loaded as unconditional
    message = str(info.value)
    assert f"{head_path} does not match a DG head dg_head(in_channels=64, num_classes=None)" in message
    assert "unexpected keys (1): label_emb.weight" in message and "missing keys" not in message


def test_classifier_mismatch_lists_only_the_first_keys(tmp_path, tiny_classifiers):
    path = saved(adm.dg_head(64), tmp_path / "discriminator_60.pt")  # a head where a classifier belongs
    with pytest.raises(CheckpointError) as info:
        load_adm_classifier(path, "cifar10")
    message = str(info.value)
    assert f"{path} does not match the 'cifar10' ADM classifier (build)" in message
    assert "input_blocks.0.0.weight [128, 64, 3, 3] in file vs [32, 3, 3, 3] in model" in message
    assert re.search(r"shape mismatches \(\d+\): .*\(and \d+ more\)", message)
    assert len(message.splitlines()) <= 5


@pytest.mark.parametrize("func, code", EXPLOITS)
def test_adm_loader_refuses_pickled_code_without_running_it(tmp_path, func, code):
    marker = tmp_path / "executed"
    path = tmp_path / "32x32_classifier.pt"
    torch.save(Exploit(func, code.format(marker=str(marker))), path)

    with pytest.raises(CheckpointError, match=f"{re.escape(str(path))}: refused unread, its pickle would call "
                                              f"(posix.system|exec)"):
        load_adm_classifier(path, "cifar10")
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: an unrestricted load runs it
    assert marker.exists()


@pytest.mark.parametrize("content, match", [
    ([1.0, 2.0], "holds a list, not a state dict"),
    ({"time_embed.0.weight": 1.0}, r"entries that are not tensors \(1\): time_embed.0.weight"),
])
def test_adm_loader_rejects_files_that_are_not_state_dicts_of_tensors(tmp_path, content, match):
    path = tmp_path / "32x32_classifier.pt"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=match) as info:
        load_adm_classifier(path, "cifar10")
    assert str(path) in str(info.value)


@pytest.mark.parametrize("config, source", [("cifar10", "alsdudrla10/DG"), ("latent", "alsdudrla10/DG_imagenet"),
                                            ("adm64", "openaipublic.blob.core.windows.net")])
def test_adm_loader_names_a_missing_file_and_where_to_get_it(tmp_path, config, source):
    with pytest.raises(FileNotFoundError, match=rf"absent\.pt .*{re.escape(source)}"):
        load_adm_classifier(tmp_path / "absent.pt", config)


def test_adm_loader_rejects_an_unknown_config(tmp_path):
    with pytest.raises(ValueError, match=r"must be one of \['adm256', 'adm64', 'cifar10', 'latent'\], got 'imagenet'"):
        load_adm_classifier(tmp_path / "classifier.pt", "imagenet")


@pytest.mark.parametrize("entry", ["dae_state_dict", "vae_state_dict"])
def test_load_lsgm_names_the_state_dict_that_holds_a_non_tensor(tmp_path, entry):
    path = tmp_path / "checkpoint_fid.pt"
    states = {"dae_state_dict": test_lsgm.tiny().state_dict(),
              "vae_state_dict": nvae.cifar10(**test_lsgm.TINY_VAE).state_dict()}
    states[entry]["step"] = 3  # an int among the tensors: the other state dict is whole
    write_lsgm_checkpoint(path, states["dae_state_dict"], states["vae_state_dict"], **test_lsgm.TINY_ARGS)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: {entry} has entries that are not tensors "
                                              r"\(1\): step$"):
        load_lsgm(path, test_lsgm.TINY_VAE, **test_lsgm.TINY)
