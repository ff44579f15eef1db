"""Seed streams: sample i of a run has its own seed (base_seed, i) and its own random generator."""

import numpy as np
import torch


def sample_seed(base_seed, index):
    """The 64-bit seed of sample `index` in run `base_seed`: a hash of the pair, so runs with different base seeds share no sample."""
    if base_seed < 0 or index < 0:
        raise ValueError(f"sample_seed needs base_seed >= 0 and index >= 0, got ({base_seed}, {index})")
    return int(np.random.SeedSequence((base_seed, index)).generate_state(1, np.uint64)[0])

SEED_STREAMS = {"fakes": 1, "real": 2}  # stream k draws at base seed k * 2**32 + seed; configured seeds are stream 0



def stream_base_seed(seed, stream):
    """The base seed of a named stream of a run with `seed`: k * 2**32 + seed for SEED_STREAMS[stream] = k, above
    [0, 2**32) where every configured seed lies (config.validate). The evaluation and callback samples draw at their
    configured seeds; the discriminator's training fakes ("fakes") and the real data's encoding ("real": subset,
    flips, posterior noise) draw above them, so no evaluated sample starts from the latents and noise of a fake (with
    one base seed for both, the unguided evaluation samples were the first fakes) or of a real image's encoding."""
    return SEED_STREAMS[stream] * 2**32 + seed



class SampleNoise:
    """Per-sample random streams (like EDM's StackedRandomGenerator): row b of every draw comes from sample b's own CPU generator.

    A sample's draws therefore depend only on its seed and on the order of the draws, not on the batch it
    is in; generators live on the CPU so the numbers are the same on any device.
    """

    def __init__(self, seeds, device="cpu"):
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        self.device = torch.device(device)

    def randn(self, size, dtype=torch.float32, device=None):
        """N(0, I) noise of `size`, where size[0] is the number of samples."""
        return self._stack(lambda g: torch.randn(size[1:], generator=g, dtype=dtype), size, device)

    def randn_like(self, x):
        """N(0, I) noise with the shape, dtype and device of x."""
        return self.randn(x.shape, dtype=x.dtype, device=x.device)

    def randint(self, high, size=()):
        """int64 integers uniform in [0, high) of shape (number of samples, *size)."""
        return self._stack(lambda g: torch.randint(high, size, generator=g), (len(self.generators), *size), None)

    def _stack(self, draw, size, device):
        """Stack one draw per generator into a batch of `size` on `device` (default: the source's device)."""
        if len(size) == 0 or size[0] != len(self.generators):
            raise ValueError(
                f"SampleNoise holds {len(self.generators)} samples but was asked for size {tuple(size)}; "
                f"the first dimension must be the number of samples"
            )
        return torch.stack([draw(g) for g in self.generators]).to(device or self.device)
