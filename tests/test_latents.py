"""The SD-VAE latent space: the autoencoder's coordinates, ADM's centre crop, the class-folder listing, and the
resumable, per-sample-seeded encoding of an image folder (with tests/standin_vae.py), and the same code paths with a
tiny real diffusers AutoencoderKL (random weights) checked against diffusers itself."""

import sys

import numpy as np
import pytest
import standin_vae
import torch
from PIL import Image

from dg_lightning.generate import generate
from dg_lightning.seeds import SampleNoise, sample_seed
from dg_lightning.shards import load_shards
from dg_lightning.sources import image_folder
from dg_lightning.latents import (
    LATENT_SCALE,
    LatentAutoencoder,
    center_crop,
    load_vae,
    shard_image_folder,
    to_signed,
)


def autoencoder(seed=0):
    torch.manual_seed(seed)
    return LatentAutoencoder(standin_vae.StandInAutoencoder())


def write_folder(root, sizes=((300, 260), (256, 400), (520, 512)), classes=("b_class", "a_class")):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for j, (h, w) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name / f"{j}.png")
    return root


def test_latent_coordinates_scale_by_0_18215():
    vae = autoencoder()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    posterior = vae.vae.encode(x).latent_dist
    assert torch.allclose(vae.encode(x), posterior.mean * LATENT_SCALE)
    noise = SampleNoise([1, 2])
    n = SampleNoise([1, 2]).randn_like(posterior.mean)
    assert torch.allclose(vae.encode(x, noise), (posterior.mean + posterior.std * n) * LATENT_SCALE)
    z = torch.randn(2, 4, 2, 2)
    assert torch.allclose(vae.decode(z), vae.vae.decode(z / LATENT_SCALE).sample)


def test_center_crop_halves_with_a_box_filter_then_cuts_the_centre():
    # 2x2 constant blocks make the box halving exact: 1024 x 512 (W x H) -> 512 x 256, no resize, central 256 columns.
    blocks = np.random.default_rng(0).integers(0, 256, (256, 512, 3), dtype=np.uint8)
    image = Image.fromarray(blocks.repeat(2, axis=0).repeat(2, axis=1))
    assert np.array_equal(center_crop(image, 256), blocks[:, 128:384])
    small = Image.fromarray(blocks[:100, :150])  # upscaled: short side to 256, then the central square
    assert center_crop(small, 256).shape == (256, 256, 3)


def test_image_folder_labels_follow_sorted_class_names_and_bad_folders_raise(tmp_path):
    files, labels, classes = image_folder(write_folder(tmp_path / "train"))
    assert classes == ["a_class", "b_class"] and labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert all(f.parent.name == classes[label] for f, label in zip(files, labels))
    (tmp_path / "train" / "c_empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"c_empty: class folder with no .*labels follow the sorted folder names"):
        image_folder(tmp_path / "train")
    (tmp_path / "flat").mkdir()
    with pytest.raises(FileNotFoundError, match=r"flat: no class subfolders with images"):
        image_folder(tmp_path / "flat")
    with pytest.raises(FileNotFoundError, match=r"nowhere: no such folder"):
        image_folder(tmp_path / "nowhere")


def test_encoding_is_per_sample_seeded_flipped_and_resumable(tmp_path):
    images = write_folder(tmp_path / "train")
    vae = autoencoder()
    out = tmp_path / "latents"
    shard_image_folder(vae, images, out, image_size=32, base_seed=7, batch_size=4, shard_size=4, progress=False)
    latents, labels = load_shards(out)
    assert latents.shape == (6, 4, 4, 4) and latents.dtype == np.float32 and labels.tolist() == [0, 0, 0, 1, 1, 1]

    # Sample i: its own coin for the flip, then its own encoding noise, from seed (7, i), whatever the batch.
    files, _, _ = image_folder(images)
    flips = []
    for i, path in enumerate(files):
        x = torch.from_numpy(center_crop(Image.open(path), 32)).permute(2, 0, 1)[None]
        noise = SampleNoise([sample_seed(7, i)])
        flip = bool(noise.randint(2))
        flips.append(flip)
        expected = vae.encode(to_signed(x.flip(-1) if flip else x), noise)
        assert torch.allclose(torch.from_numpy(latents[i]), expected[0], atol=1e-6)
    assert 0 < sum(flips) < len(flips)

    # A deleted shard is made again, identically, with another batch size; a different run's folder raises.
    before = (out / "shard-000001.npz").read_bytes()
    (out / "shard-000001.npz").unlink()
    shard_image_folder(vae, images, out, image_size=32, base_seed=7, batch_size=1, shard_size=4, progress=False)
    assert np.array_equal(np.load(out / "shard-000001.npz")["samples"], np.load(_bytes(tmp_path, before))["samples"])
    with pytest.raises(ValueError, match=r"holds another run's samples .*base_seed"):
        shard_image_folder(vae, images, out, image_size=32, base_seed=8, shard_size=4, progress=False)


def _bytes(tmp_path, data):
    path = tmp_path / "copy.npz"
    path.write_bytes(data)
    return path


def test_num_samples_takes_a_seeded_subset(tmp_path):
    images = write_folder(tmp_path / "train")
    shard_image_folder(autoencoder(), images, tmp_path / "a", image_size=16, num_samples=4, flip=False, progress=False)
    latents, labels = load_shards(tmp_path / "a")
    assert latents.shape == (4, 4, 2, 2) and set(labels) <= {0, 1}


def test_load_vae_names_the_folder_and_the_extra(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"sd-vae: no config.json; .*huggingface.co/stabilityai/sd-vae-ft-mse"):
        load_vae(tmp_path / "sd-vae")
    tiny_sd_vae(tmp_path / "sd-vae")
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if diffusers were not installed
    with pytest.raises(ImportError, match=r"pip install -e '\.\[imagenet\]'"):
        load_vae(tmp_path / "sd-vae")


def tiny_sd_vae(folder, seed=0, **save):
    """A tiny diffusers AutoencoderKL with random weights (3 x 16 x 16 <-> 4 x 8 x 8), saved into folder."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                        sample_size=16)
    vae.save_pretrained(folder, **save)
    return vae.eval()


@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "bin"])
def test_load_vae_loads_a_real_autoencoder_kl_exactly(tmp_path, safe_serialization):
    vae = tiny_sd_vae(tmp_path / "sd-vae", safe_serialization=safe_serialization)
    loaded = load_vae(tmp_path / "sd-vae")
    assert type(loaded) is type(vae) and not loaded.training
    expected, found = vae.state_dict(), loaded.state_dict()
    assert found.keys() == expected.keys() and all(torch.equal(found[k], v) for k, v in expected.items())


def test_load_vae_refuses_missing_broken_or_mismatched_weights(tmp_path):
    from safetensors.torch import save_file

    state = tiny_sd_vae(tmp_path / "sd-vae").state_dict()
    weights = tmp_path / "sd-vae" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match=r"sd-vae: diffusers could not load .*diffusion_pytorch_model.safetensors is broken"):
        load_vae(tmp_path / "sd-vae")
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=r"sd-vae: no weights file \(diffusion_pytorch_model.safetensors or "):
        load_vae(tmp_path / "sd-vae")
    # Weights that do not fill the config's model, or hold more, are refused instead of left random or ignored.
    save_file({k: v for k, v in state.items() if not k.startswith("decoder.conv_out.")}, weights)
    with pytest.raises(ValueError, match=r"sd-vae: .* does not match config.json \(missing keys: decoder.conv_out.bias, "
                                         r"decoder.conv_out.weight\)"):
        load_vae(tmp_path / "sd-vae")
    save_file({**state, "extra.weight": torch.zeros(1)}, weights)
    with pytest.raises(ValueError, match=r"unexpected keys: extra.weight"):
        load_vae(tmp_path / "sd-vae")


def test_encode_stage_with_a_real_autoencoder_kl_matches_diffusers(tmp_path):
    vae = tiny_sd_vae(tmp_path / "sd-vae")
    ours = LatentAutoencoder(load_vae(tmp_path / "sd-vae"))
    images = write_folder(tmp_path / "train", sizes=((16, 16),) * 3)  # already 16 x 16: the centre crop keeps them
    shard_image_folder(ours, images, tmp_path / "latents", image_size=16, base_seed=3, batch_size=6, shard_size=6,
                        progress=False)
    latents, _ = load_shards(tmp_path / "latents")

    # diffusers' own posterior sample, with sample i's generator seeded by (3, i): first its flip coin, then the noise.
    files, _, _ = image_folder(images)
    generators = [torch.Generator().manual_seed(sample_seed(3, i)) for i in range(len(files))]
    flips = [bool(torch.randint(2, (), generator=g)) for g in generators]
    x = torch.stack([torch.from_numpy(np.array(Image.open(f))).permute(2, 0, 1) for f in files]).float() / 127.5 - 1
    x = torch.stack([image.flip(-1) if flip else image for image, flip in zip(x, flips)])
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        expected = 0.18215 * posterior.sample(generator=generators)
    assert 0 < sum(flips) < len(flips)
    torch.testing.assert_close(torch.from_numpy(latents), expected, rtol=0, atol=0)
    assert not torch.allclose(expected, 0.18215 * posterior.mean, atol=1e-3)  # the noise is really there
    torch.testing.assert_close(ours.encode(x), 0.18215 * posterior.mean, rtol=0, atol=0)


def test_decode_at_sampling_time_with_a_real_autoencoder_kl_matches_diffusers(tmp_path):
    vae = tiny_sd_vae(tmp_path / "sd-vae")
    decoder = LatentAutoencoder(load_vae(tmp_path / "sd-vae"))
    generate(lambda latents, labels, noise: decoder.decode(latents), tmp_path / "samples", num_samples=5,
             shape=(4, 8, 8), out_shape=(3, 16, 16), base_seed=2, batch_size=5, shard_size=5, progress=False)
    samples, _ = load_shards(tmp_path / "samples")

    # diffusers' decode of latent / 0.18215 for sample i's N(0, I) latents, quantised as clip(x * 127.5 + 128, 0, 255).
    z = torch.stack([torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(sample_seed(2, i))) for i in range(5)])
    with torch.no_grad():
        images = vae.decode(z / 0.18215).sample
    torch.testing.assert_close(decoder.decode(z), images, rtol=0, atol=0)
    expected = (images * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert samples.dtype == np.uint8 and np.array_equal(samples, expected)
    assert 0.5 < np.mean((expected > 0) & (expected < 255))  # mostly unclipped, so the comparison means something
