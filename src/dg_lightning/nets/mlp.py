"""The toy 2-D discriminator (paper §5.1): an MLP, 4 layers x 256 units, with a time embedding."""

from torch import nn

from dg_lightning.nets.embedding import timestep_embedding


class MLPDiscriminator(nn.Module):
    """logit = MLP([x_vp, embedding(999 tau)]): 4 hidden layers of `width` SiLU units, then one logit."""

    def __init__(self, in_dim=2, width=256, depth=4, time_dim=128):
        super().__init__()
        self.time_dim = time_dim
        self.time_embed = nn.Sequential(nn.Linear(time_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.input = nn.Linear(in_dim, width)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(depth - 1))
        self.out = nn.Linear(width, 1)

    def forward(self, x_vp, tau, class_labels=None):
        """The logit log(d / (1 - d)) at VP coordinates x_vp (B, D) and VP time tau (B,)."""
        h = nn.functional.silu(self.input(x_vp) + self.time_embed(timestep_embedding(999.0 * tau, self.time_dim)))
        for layer in self.hidden:
            h = nn.functional.silu(layer(h))
        return self.out(h).squeeze(-1)
