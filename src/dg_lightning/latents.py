"""Latent spaces of the latent G++ rows: DiT-XL/2-G++'s SD-VAE (the autoencoder, ADM's centre crop) and LSGM-G++'s NVAE
(NVAELatents), and the resumable stage that encodes images into latent shards (shard_images: an ImageNet-style image
folder, or in-memory real images; for ADM-G++ in pixel space, shards of the uint8 centre crops themselves).

SD-VAE latents are z = 0.18215 E(x) for images x in [-1, 1] NCHW, images are D(z / 0.18215). The autoencoder is
diffusers' AutoencoderKL (sd-vae-ft-mse / sd-vae-ft-ema from a local folder; the optional extra `imagenet`) or
any module with its interface: encode(x).latent_dist with .mean and .std, decode(z).sample.
The latent shards are in dg_lightning.shards' format (float32 samples, int64 labels), so load_shards and
sources.load_source read them; sample i is image i, flipped and encoded with the noise of its own seed
(base_seed, i), so a killed run resumes with identical shards.
"""

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from dg_lightning.distributed import barrier, rank_and_world_size
from dg_lightning.files import write_atomic
from dg_lightning.generate import claim_shards
from dg_lightning.seeds import SampleNoise, sample_seed
from dg_lightning.shards import FORMAT, shard_indices, shard_name, to_uint8
from dg_lightning.progress import track
from dg_lightning.sources import SourceError, image_folder

LATENT_SCALE = 0.18215  # the SD-VAE scaling factor (DiT, DG_imagenet)
VAE_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")  # preferred first
VAE_SOURCE = "https://huggingface.co/stabilityai/sd-vae-ft-mse (and sd-vae-ft-ema): config.json and the weights"


class LatentAutoencoder(nn.Module):
    """An AutoencoderKL-like VAE in DiT's latent coordinates z = 0.18215 E(x), frozen in eval mode."""

    def __init__(self, vae, scale=LATENT_SCALE):
        super().__init__()
        self.vae, self.scale = vae.eval().requires_grad_(False), scale

    @torch.no_grad()
    def encode(self, images, noise=None):
        """Latents 0.18215 z of images in [-1, 1] NCHW: z = mean + std n with n from noise.randn_like (per-sample
        streams, a SampleNoise), or the posterior mean when noise is None."""
        posterior = self.vae.encode(images).latent_dist
        z = posterior.mean if noise is None else posterior.mean + posterior.std * noise.randn_like(posterior.mean)
        return z.float() * self.scale

    @torch.no_grad()
    def decode(self, latents):
        """Images D(latents / 0.18215) in about [-1, 1] NCHW, float32."""
        return self.vae.decode(latents / self.scale).sample.float()


def load_vae(path):
    """diffusers' AutoencoderKL from a local folder (config.json and diffusion_pytorch_model.safetensors or .bin),
    never online, strictly: every parameter comes from the weights file and the file holds nothing else."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json; expected a local SD-VAE folder (config.json and "
                                f"{' or '.join(VAE_WEIGHTS)}), downloaded from {VAE_SOURCE}")
    weights = next((path / name for name in VAE_WEIGHTS if (path / name).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{path}: no weights file ({' or '.join(VAE_WEIGHTS)}) next to config.json; "
                                f"download it from {VAE_SOURCE}")
    try:
        from diffusers import AutoencoderKL
    except ImportError as exc:
        raise ImportError("the SD-VAE needs diffusers, the optional extra of the ImageNet experiments: "
                          "pip install -e '.[imagenet]'") from exc
    try:
        vae, info = AutoencoderKL.from_pretrained(path, local_files_only=True, low_cpu_mem_usage=False,
                                                  use_safetensors=weights.suffix == ".safetensors",
                                                  output_loading_info=True)
    except (OSError, RuntimeError) as exc:
        raise OSError(f"{path}: diffusers could not load this SD-VAE folder ({exc}); config.json or {weights.name} "
                      f"is broken, truncated or of another model: download them again from {VAE_SOURCE}") from exc
    wrong = {key: sorted(info[key]) for key in ("missing_keys", "unexpected_keys") if info[key]}
    if wrong:
        found = "; ".join(f"{key.replace('_', ' ')}: {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}"
                          for key, names in wrong.items())
        raise ValueError(f"{path}: {weights.name} does not match config.json ({found}); the weights are of another "
                         f"model or incomplete: download the folder again from {VAE_SOURCE}")
    return vae


def center_crop(image: Image.Image, size):
    """ADM's centre crop: halve with a box filter while the short side is >= 2 size, resize the short side to size
    (bicubic), cut the central size x size square; RGB uint8 (size, size, 3)."""
    image = image.convert("RGB")
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC)
    pixels = np.array(image)
    top, left = (pixels.shape[0] - size) // 2, (pixels.shape[1] - size) // 2
    return pixels[top:top + size, left:left + size]


class CroppedImages(Dataset):
    """Item j: (uint8 CHW centre crop of files[j], j); decoded in DataLoader workers. A file that cannot be decoded
    (truncated, corrupt, not an image) raises SourceError naming it."""

    def __init__(self, files, size):
        self.files, self.size = files, size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, j):
        try:
            with Image.open(self.files[j]) as image:
                return torch.from_numpy(center_crop(image, self.size)).permute(2, 0, 1), j
        except OSError as exc:  # PIL's truncated or unidentified image
            raise SourceError(f"{self.files[j]}: not a readable image ({exc}); replace it with an intact copy, or remove "
                              "it (the stage then encodes the folder without it)") from exc


def jpeg_round_trip(images, quality=75):
    """uint8 NCHW RGB images written as JPEG (PIL, quality) and read back, as the authors' fakes were stored."""
    def one(image):
        buffer = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).save(buffer, format="JPEG", quality=quality)
        return torch.from_numpy(np.asarray(Image.open(buffer))).permute(2, 0, 1)
    return torch.stack([one(image) for image in images]).to(images.device)


def to_signed(images):
    """uint8 NCHW images as floats in [-1, 1] (x / 127.5 - 1)."""
    return images.float() / 127.5 - 1.0


def shard_image_folder(autoencoder, image_dir, out_dir, *, image_size=256, num_samples=None, base_seed=0, **options):
    """The images of an ImageNet-style folder as labelled shards (shard_images): centre crops of image_size, as uint8
    pixels (autoencoder None, ADM-G++) or encoded to latents (DiT-G++). Sample i is image order[i]: all images in
    sorted order, or with num_samples a seeded random subset; its label comes from its class folder. Returns the
    class names."""
    files, labels, classes = image_folder(image_dir)
    order = np.arange(len(files))
    if num_samples is not None and num_samples < len(files):
        order = np.sort(np.random.default_rng(base_seed).permutation(len(files))[:num_samples])
    shard_images(autoencoder, CroppedImages([files[j] for j in order], image_size), out_dir, labels=labels[order],
                 num_classes=len(classes), base_seed=base_seed, name=Path(image_dir).name, **options)
    return classes


def shard_images(autoencoder, images: Dataset, out_dir, *, labels=None, num_classes=None, flip=True, base_seed=0,
                 batch_size=64, shard_size=1000, num_workers=0, fingerprint=None, device="cpu", rank=None,
                 world_size=None, progress=True, name="images"):
    """A dataset of images (item i: (uint8 CHW image, i)) as shards, as uint8 NHWC pixels (autoencoder None) or encoded
    to latents by the autoencoder (encode(x in [-1, 1], SampleNoise)). Writes this rank's missing shards
    (k % world_size == rank), then waits for the other ranks (rank and world_size default to this process's place in
    torch.distributed's group, as generate's).

    Sample i is image i, flipped left-right when flip and a coin from its own seed (base_seed, i) says so, and encoded
    with noise from the same seed, so a killed run resumes with identical shards. Shards hold float32 latents or the
    uint8 pixels, and labels[i] (int64, in [0, num_classes)) when labels are given, in the shard format of
    dg_lightning.shards; finished shards are kept, a folder of another run raises.
    """
    rank, world_size = rank_and_world_size(rank, world_size)
    device = torch.device(device)
    shape = tuple(images[0][0].shape)
    if autoencoder is None:
        sample_shape, dtype = (*shape[1:], shape[0]), "uint8"
    else:
        sample_shape = tuple(autoencoder.encode(torch.zeros(1, *shape, device=device)).shape[1:])
        dtype = "float32"
    manifest = {"format": FORMAT, "num_samples": len(images), "shape": list(shape), "sample_shape": list(sample_shape),
                "shard_size": shard_size, "base_seed": base_seed, "num_classes": num_classes, "dtype": dtype,
                "fingerprint": fingerprint}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _, _, todo = claim_shards(out_dir, manifest, rank, world_size)
    for k in track(todo, f"encode {name} -> {out_dir.name}", enabled=progress):
        indices = shard_indices(manifest, k)
        samples = np.empty((len(indices), *sample_shape), dtype)
        for batch, rows in DataLoader(Subset(images, indices), batch_size=batch_size, num_workers=num_workers):
            rows = rows - indices.start
            noise = SampleNoise([sample_seed(base_seed, indices.start + int(row)) for row in rows], device)
            x = batch.to(device)
            if flip:
                x = torch.where(noise.randint(2).view(-1, 1, 1, 1).bool(), x.flip(-1), x)
            encoded = x.permute(0, 2, 3, 1) if autoencoder is None else autoencoder.encode(to_signed(x), noise)
            samples[rows.numpy()] = encoded.cpu().numpy()
        arrays = {"samples": samples, "indices": np.arange(indices.start, indices.stop, dtype=np.int64)}
        if labels is not None:
            arrays["labels"] = np.asarray(labels[indices.start:indices.stop], dtype=np.int64)
        write_atomic(out_dir / shard_name(k), lambda f, arrays=arrays: np.savez(f, **arrays))
    barrier()


class ArrayImages(Dataset):
    """Item i: (uint8 CHW image i of an NHWC array, i): in-memory real images for shard_images."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1), i


class NVAELatents(nn.Module):
    """LSGM's NVAE (nets.nvae.NVAE) with LatentAutoencoder's interface, in the latent score model's own coordinates (no
    scale), frozen in eval mode."""

    def __init__(self, nvae):
        super().__init__()
        self.vae = nvae.eval().requires_grad_(False)

    @property
    def image_shape(self):
        """The decoded images' (C, H, W)."""
        return (self.vae.img_channels, self.vae.img_resolution, self.vae.img_resolution)

    @torch.no_grad()
    def encode(self, images, noise=None):
        """Latents (B, C, r, r) of images in [-1, 1] NCHW: the NVAE's posterior sample, its standard normals drawn
        from noise.randn (per-sample streams, a SampleNoise; None: torch's global generator)."""
        v = self.vae
        shape = (images.shape[0], v.latent_channels, v.latent_resolution, v.latent_resolution)
        return v.encode(images, None if noise is None else noise.randn(shape, dtype=images.dtype, device=images.device))

    @torch.no_grad()
    def decode(self, latents):
        """Images in [-1, 1] NCHW: the mean of the NVAE decoder's logistic mixture given the latents."""
        return self.vae.decode(latents).float()


def round_trip(decoder: LatentAutoencoder, encoder: LatentAutoencoder, latents, noise, jpeg_quality=None):
    """Latents through the authors' storage of fakes: decode, quantise to uint8 (optionally JPEG), encode again
    with noise (a SampleNoise)."""
    images = to_uint8(decoder.decode(latents))
    if jpeg_quality is not None:
        images = jpeg_round_trip(images, jpeg_quality)
    return encoder.encode(to_signed(images), noise)
