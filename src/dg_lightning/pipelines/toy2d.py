"""The toy 2-D experiment (paper §5.1, Figures 6 and 8): a wrong mixture's exact score -> fakes -> MLP discriminator ->
sampling with no DG, DG and the analytic optimal d*, scored by the sliced Wasserstein distance to fresh data."""

import functools

import torch
from hydra.utils import instantiate

from dg_lightning.callbacks import SamplingTask
from dg_lightning.config import ConfigError
from dg_lightning.data import ArraySource
from dg_lightning.files import atomic_save, load_weights
from dg_lightning.held_out import resolve_t_max, sampling_window
from dg_lightning.metrics import SlicedWasserstein, sliced_wasserstein
from dg_lightning.pipelines.recipe import Pipeline, Stage, train_stage
from dg_lightning.plots import sampling_points_figure, toy2d_figure
from dg_lightning.sampling import build_sampler
from dg_lightning.sde import LinearVP
from dg_lightning.toy import MixtureDenoiser, OptimalDiscriminator
from dg_lightning.training import build_network, train_discriminator


def generator(seed, stream):
    """A CPU generator for one named random stream of the run (0 real data, 1 fakes, 2 evaluation latents, ...)."""
    return torch.Generator().manual_seed(seed * 1000 + stream)


def mean_log_ratio_curves(discriminator, samples, taus, vp=LinearVP(), seed=0):
    """Mean log(d / (1 - d)) over each named sample set diffused to each VP time tau (the paper's Figure 8)."""
    generator = torch.Generator().manual_seed(seed)
    curves = {}
    with torch.no_grad():
        for name, x0 in samples.items():
            values = []
            for tau in taus:
                t = torch.full((x0.shape[0],), float(tau))
                x_t = vp.diffuse(x0, t, torch.randn(x0.shape, generator=generator))
                values.append(discriminator(x_t, t).mean().item())
            curves[name] = values
    return curves


def check(cfg):
    """ConfigError before any compute when the data and model mixtures differ in dimension."""
    data, model = instantiate(cfg.data.mixture), instantiate(cfg.score.mixture)
    if data.dim != model.dim:
        raise ConfigError("score.mixture.means", f"the model is {model.dim}-D but the data are {data.dim}-D",
                          "give both mixtures the same dimension")


def generate(run):
    """Fakes x0 ~ q through the model's PF-ODE (no guidance): data.num_fake for training, then data.num_held_out held
    out of it from their own latents stream, in fakes.pt."""
    cfg, fakes_file = run.cfg, run.folder / "fakes.pt"
    if not fakes_file.exists():
        model = instantiate(cfg.score.mixture)
        sample_fn = build_sampler(cfg, MixtureDenoiser(model), progress=True)
        latents = [torch.randn(n, model.dim, generator=generator(cfg.seed, stream))
                   for n, stream in ((cfg.data.num_fake, 1), (cfg.data.num_held_out, 6))]
        atomic_save(torch.cat([sample_fn(z, None, None) for z in latents]), fakes_file)
    return load_weights(fakes_file)


def sampling_task(cfg):
    """The guided-sampling callback's task: DG samples of the model's mixture score with the current discriminator
    (with guidance.dg.t_max=auto, which the trained head decides, over t_max = 1), scored by their SWD to
    callbacks.sampling.num_samples fresh data samples of their own stream, drawn over them."""
    cfg, denoiser = sampling_window(cfg), MixtureDenoiser(instantiate(cfg.score.mixture))
    reference = instantiate(cfg.data.mixture).sample(cfg.callbacks.sampling.num_samples, generator(cfg.seed, 7))
    return SamplingTask(
        lambda discriminator, latents, labels, noise: build_sampler(cfg, denoiser, discriminator)(latents, labels, noise),
        SlicedWasserstein(reference, cfg.metrics.num_projections, seed=cfg.seed), (reference.shape[1],),
        batch_size=cfg.callbacks.sampling.num_samples, convert=lambda points: points,
        draw=functools.partial(sampling_points_figure, reference))


def train(run):
    """The MLP discriminator on real vs fake, diffused on the fly, with the guided-sampling callback; data.num_held_out
    reals of their own stream and the held-out fakes are its held-out split. Returns the discriminator that
    discriminator.select picks (the last epoch's, or the callback's best by SWD)."""
    cfg = run.cfg
    mixture = instantiate(cfg.data.mixture)
    real = torch.cat([mixture.sample(n, generator=generator(cfg.seed, stream))
                      for n, stream in ((cfg.data.num_real, 0), (cfg.data.num_held_out, 5))])
    net = build_network(cfg, cfg.discriminator.net, cfg.discriminator.seed)
    return train_discriminator(cfg, ArraySource(real.numpy(), name="data.mixture samples"),
                               ArraySource(run.results["generate"].numpy(), name="fakes"), net, run.loggers, run.folder,
                               lambda: sampling_task(cfg), run.metrics)


def sample(run):
    """The same latents sampled with no DG, the trained discriminator and the exact d*; SWD to fresh data samples,
    the floor (a second data sample), each sampler's NFE, and toy2d.png."""
    cfg, n = resolve_t_max(run.cfg, run.folders["train"], run.metrics), run.cfg.metrics.num_samples
    data, model = instantiate(cfg.data.mixture), instantiate(cfg.score.mixture)
    denoiser, net = MixtureDenoiser(model), run.results["train"]
    latents = torch.randn(n, data.dim, generator=generator(cfg.seed, 2))
    reference, floor = data.sample(n, generator(cfg.seed, 3)), data.sample(n, generator(cfg.seed, 4))
    sample_fns = {name: build_sampler(cfg, denoiser, discriminator, progress=True)
                  for name, discriminator in (("no_dg", None), ("dg", net), ("dg_optimal", OptimalDiscriminator(data, model)))}
    samples = {name: sample_fn(latents, None, None) for name, sample_fn in sample_fns.items()}
    scores = {name: sliced_wasserstein(x, reference, cfg.metrics.num_projections, seed=cfg.seed)
              for name, x in {**samples, "floor": floor}.items()}
    run.metrics.update({f"toy/swd_{name}": value for name, value in scores.items()})
    run.metrics.update({f"toy/nfe_{name}": sample_fn.nfe[0] for name, sample_fn in sample_fns.items()})
    taus = torch.linspace(cfg.guidance.dg.t_min, cfg.guidance.dg.t_max, 40).tolist()
    sets = {"data": reference, "no_dg": samples["no_dg"], "dg": samples["dg"]}
    curves = mean_log_ratio_curves(net, sets, taus, seed=cfg.seed)
    toy2d_figure(reference, samples, taus, curves, scores, run.out_dir / "toy2d.png")


PIPELINE = Pipeline("toy2d", check=check, stages=(
    Stage("generate", generate, keys=("seed", "score", "sampler", "data.num_fake", "data.num_held_out")),
    train_stage(train, ("seed", "data", "discriminator"), ("score", "sampler", "metrics"), inputs=("generate",)),
    Stage("sample", sample, keys=("seed", "data.mixture", "score", "sampler", "guidance", "metrics"), inputs=("train",)),
))
