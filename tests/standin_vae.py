"""A tiny stand-in for diffusers' AutoencoderKL with its interface (encode(x).latent_dist.mean / .std / .sample(),
decode(z).sample), so the ImageNet tests need no diffusers: 8x8 patches <-> 4 latent channels, random weights.
`load(path)` reads the folder the tests write (standin.pt), as load_vae reads an SD-VAE folder."""

from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn


class Posterior:
    """A diagonal Gaussian with DiagonalGaussianDistribution's attributes."""

    def __init__(self, mean, logvar):
        self.mean, self.std = mean, torch.exp(0.5 * logvar)

    def sample(self, generator=None):
        return self.mean + self.std * torch.randn(self.mean.shape, generator=generator)


class StandInAutoencoder(nn.Module):
    """x (B, 3, H, W) -> latents (B, 4, H / 8, W / 8) and back."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Conv2d(3, 8, 8, stride=8)
        self.decoder = nn.ConvTranspose2d(4, 3, 8, stride=8)

    def encode(self, x):
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return SimpleNamespace(latent_dist=Posterior(mean, logvar.clamp(-6, -2)))

    def decode(self, z):
        return SimpleNamespace(sample=torch.tanh(self.decoder(z)))


def write(folder, seed=0):
    """A stand-in 'VAE folder' with random weights."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    torch.save(StandInAutoencoder().state_dict(), folder / "standin.pt")
    return folder


def load(path):
    """The stand-in autoencoder of the folder `path`."""
    vae = StandInAutoencoder()
    vae.load_state_dict(torch.load(Path(path) / "standin.pt", weights_only=True))
    return vae
