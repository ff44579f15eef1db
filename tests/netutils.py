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


def write_soft_truncation_checkpoint(path, net, seed=0, scale=0.05):
    """Save `net` as Soft Truncation's run_lib does: {optimizer: an Adam state dict, model: the state dict of
    DataParallel(net) (keys `module.*`, buffers included), ema: {decay, num_updates, shadow_params: one tensor per
    parameter, in parameters() order}, step}. The shadow parameters are the weights plus N(0, scale^2) noise, so they
    differ from the model's; returns them as a list."""
    generator = torch.Generator().manual_seed(seed)
    shadow = [p.detach() + scale * torch.randn(p.shape, generator=generator) for p in net.parameters()]
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-4)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # the Adam state (step, exp_avg, exp_avg_sq) a trained checkpoint holds
    net.zero_grad(set_to_none=True)
    torch.save(dict(optimizer=optimizer.state_dict(),
                    model={f"module.{k}": v for k, v in net.state_dict().items()},
                    ema=dict(decay=0.9999, num_updates=3, shadow_params=shadow), step=3), path)
    return shadow
