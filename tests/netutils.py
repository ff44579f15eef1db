"""Random weights for network tests, so that zero-initialised layers hide nothing."""

import torch


def randomized(net, seed=0, scale=0.3):
    """Overwrite every parameter with N(0, scale^2) noise."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))
    return net


def randomized_zeros(net, seed=0, scale=0.2):
    """Fill only the all-zero parameters (residual branch outputs) with N(0, scale^2) noise, so every branch acts."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in net.parameters():
            if not parameter.any():
                parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))
    return net
