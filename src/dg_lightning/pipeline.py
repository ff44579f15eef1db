"""The experiments' pipelines (paper Algorithms 1 and 2), wired from the Hydra config.

Stages run in order (generate fakes -> train the discriminator -> sample and evaluate); `stage=<name>`
stops after that stage. Finished stages are cached by config fingerprint (dg_lightning.stages). The ImageNet
pipelines (DiT-XL/2-G++, ADM-G++) are in dg_lightning.imagenet.
"""

import json
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.nn import functional as F

from dg_lightning.accel import accelerate
from dg_lightning.callbacks import BEST_DISCRIMINATOR, GuidedSamplingCallback
from dg_lightning.checkpoints import ADM_CLASSIFIERS, EDM_SOURCE, load_adm_classifier, load_dg_discriminator, load_edm
from dg_lightning.config import ConfigError, validate
from dg_lightning.data import ArraySource, load_digits_split
from dg_lightning.generate import generate, load_shards, rank_and_world_size, stream_base_seed
from dg_lightning.loggers import build_loggers, finish_loggers
from dg_lightning.metrics import ClassifierFeatures, GenerativeMetrics, GreyAsRGB, inception_features, sliced_wasserstein
from dg_lightning.nets.adm import Discriminator
from dg_lightning.plots import image_grid, toy2d_figure
from dg_lightning.pretrain import NoisyClassifierModule, ScoreModule, train_feature_classifier
from dg_lightning.samplers import edm_sampler
from dg_lightning.sde import LinearVP
from dg_lightning.sources import load_source
from dg_lightning.stages import (atomic_save, build_accel, build_network, dg_guidance, finished_metrics, fingerprint,
                                 launch, pretrain, sampler_kwargs, stage_dir, train_discriminator, write_metrics)
from dg_lightning.toy import MixtureDenoiser, OptimalDiscriminator

TOY_STAGES = ("generate", "train", "sample")


def _generator(seed, offset):
    """A CPU generator for one named random stream of the run (real data, fakes, evaluation latents, ...)."""
    return torch.Generator().manual_seed(seed * 1000 + offset)


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


def run_toy2d(cfg: DictConfig):
    """The toy 2-D experiment: exact wrong score -> fakes -> MLP discriminator -> sampling with no DG, DG and the optimal d*."""
    data, model = instantiate(cfg.data.mixture), instantiate(cfg.score.mixture)
    if data.dim != model.dim:
        raise ConfigError("score.mixture.means", f"the model is {model.dim}-D but the data are {data.dim}-D", "give both mixtures the same dimension")
    L.seed_everything(cfg.seed, verbose=False)
    out_dir, stop = cfg.paths.output_dir, TOY_STAGES.index(cfg.stage) if cfg.stage != "all" else len(TOY_STAGES) - 1
    loggers = build_loggers(cfg)
    denoiser = MixtureDenoiser(model)
    unguided = sampler_kwargs(cfg, guided=False)

    # Stage 1: fakes x0 ~ q through the model's PF-ODE (no guidance).
    fakes_file = stage_dir(cfg, "generate", ["seed", "score", "sampler", "data.num_fake"]) / "fakes.pt"
    if not fakes_file.exists():
        latents = torch.randn(cfg.data.num_fake, data.dim, generator=_generator(cfg.seed, 1))
        atomic_save(edm_sampler(denoiser, latents, progress=True, **unguided), fakes_file)
    fakes = torch.load(fakes_file, weights_only=True)
    metrics = {}
    if stop >= 1:
        # Stage 2: the discriminator on real vs fake, diffused on the fly.
        real = data.sample(cfg.data.num_real, generator=_generator(cfg.seed, 0))
        keys = ["seed", "data", "score", "sampler", "discriminator", "trainer.max_steps", "trainer.max_epochs"]
        net = train_discriminator(cfg, ArraySource(real.numpy(), name="data.mixture samples"), ArraySource(fakes.numpy(), name="fakes"),
                                  build_network(cfg, cfg.discriminator.net, cfg.discriminator.seed), loggers,
                                  stage_dir(cfg, "train", keys))
    if stop >= 2:
        # Stage 3: the same latents sampled with no DG, the trained discriminator, and the exact d*.
        n = cfg.metrics.num_samples
        latents = torch.randn(n, data.dim, generator=_generator(cfg.seed, 2))
        reference, floor = data.sample(n, _generator(cfg.seed, 3)), data.sample(n, _generator(cfg.seed, 4))
        guided = dict(sampler_kwargs(cfg), progress=True)
        samples = {
            "no_dg": edm_sampler(denoiser, latents, progress=True, **unguided),
            "dg": edm_sampler(denoiser, latents, guidance=dg_guidance(cfg, net), **guided),
            "dg_optimal": edm_sampler(denoiser, latents, guidance=dg_guidance(cfg, OptimalDiscriminator(data, model)), **guided),
        }
        swd = lambda x, y: sliced_wasserstein(x, y, cfg.metrics.num_projections, seed=cfg.seed)  # noqa: E731
        metrics = {f"toy/swd_{name}": swd(x, reference) for name, x in samples.items()}
        metrics["toy/swd_floor"] = swd(floor, reference)
        taus = torch.linspace(cfg.guidance.dg.t_min, cfg.guidance.dg.t_max, 40).tolist()
        curves = mean_log_ratio_curves(net, {"real": reference, "fake": samples["no_dg"], "guided (DG)": samples["dg"]}, taus, seed=cfg.seed)
        toy2d_figure(reference, samples, taus, curves, metrics, f"{out_dir}/toy2d.png")
    write_metrics(out_dir, metrics)
    finish_loggers(loggers, metrics)
    return metrics


DIGITS_STAGES = ("pretrain_score", "pretrain_classifier", "generate", "train", "sample")
DIGITS_DATA_KEYS = ["data.source", "data.num_held_out", "data.split_seed"]
SCORE_KEYS = ["seed", "score", "discriminator.conditional", "data.num_classes", *DIGITS_DATA_KEYS]  # the score model's inputs
UNGUIDED_KEYS = [*SCORE_KEYS, "sampler", "metrics.num_samples", "metrics.sampling_seed"]  # shared by DG sweeps


def _frozen(net, weights):
    """net with the state dict in `weights` (weights_only), in eval mode, without parameter gradients."""
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return net.eval().requires_grad_(False)


def _with(node, **values):
    """A resolved copy of a config node with `values` set (keys it need not have)."""
    return OmegaConf.create({**OmegaConf.to_container(node, resolve=True), **values})


def conditional_classes(cfg: DictConfig):
    """data.num_classes for a class-conditional run (discriminator.conditional), None for an unconditional one."""
    return cfg.data.num_classes if cfg.discriminator.conditional else None


class IndexLabels(torch.nn.Module):
    """An EDM denoiser D(x; sigma, one-hot float labels) called with int64 class indices (B,), the labels that the
    generator draws and DG's ADM head takes: the one place where index labels become one-hot."""

    def __init__(self, denoiser):
        super().__init__()
        self.denoiser = denoiser
        self.img_channels, self.img_resolution = denoiser.img_channels, denoiser.img_resolution

    def forward(self, x, sigma, class_labels=None):
        """D(x; sigma) with class_labels one-hot encoded (None: unconditional)."""
        one_hot = None if class_labels is None else torch.nn.functional.one_hot(class_labels, self.denoiser.label_dim).float()
        return self.denoiser(x, sigma, one_hot)


def pretrained_score(cfg: DictConfig, train: ArraySource):
    """Stage pretrain_score: the EDM denoiser (EMA weights) trained with the EDM loss on the training digits, with
    one-hot labels when the run is class-conditional; returned as IndexLabels (int64 class indices)."""
    net = _with(cfg.score.net, label_dim=conditional_classes(cfg) or 0)
    folder = stage_dir(cfg, "pretrain_score", SCORE_KEYS)
    weights = folder / "score_ema.pt"
    if not weights.exists():
        s = cfg.score
        module = ScoreModule(build_network(cfg, net), instantiate(s.loss), lr=s.lr, warmup_steps=s.warmup_steps,
                             ema_halflife_images=s.ema_halflife_images)
        pretrain(cfg, module, train, s.batch_size, s.max_steps, module.ema_network(), weights)
    return IndexLabels(_frozen(instantiate(net), weights))


def pretrained_classifier(cfg: DictConfig, train: ArraySource):
    """Stage pretrain_classifier: the noise-aware EncoderUNet p(y | x_t, t) on LVP-noised training digits."""
    c = cfg.discriminator.classifier
    folder = stage_dir(cfg, "pretrain_classifier", ["seed", "discriminator.classifier", "data.t_min", *DIGITS_DATA_KEYS])
    weights = folder / "classifier.pt"
    if not weights.exists():
        module = NoisyClassifierModule(build_network(cfg, c.net), lr=c.lr, weight_decay=c.weight_decay, t_min=cfg.data.t_min)
        pretrain(cfg, module, train, c.batch_size, c.max_steps, module.classifier, weights)
    return _frozen(instantiate(c.net), weights)


def sample_images(cfg: DictConfig, denoiser, folder, num_samples, base_seed, discriminator=None, num_classes=None):
    """Images from the EDM sampler (with DG when a discriminator is given) through the sharded, resumable generator,
    on the denoiser's device; with num_classes, sample i gets an int64 class label drawn from its own seed."""
    guided = discriminator is not None
    kwargs = sampler_kwargs(cfg, guided)
    guidance = dg_guidance(cfg, discriminator) if guided else None

    run_denoiser = accelerate(denoiser, build_accel(cfg))

    def sample_fn(latents, class_labels, noise):
        return edm_sampler(run_denoiser, latents, class_labels, guidance, randn_like=noise.randn_like, **kwargs)

    shape = (denoiser.img_channels, denoiser.img_resolution, denoiser.img_resolution)
    generate(sample_fn, folder, num_samples, shape, base_seed=base_seed, batch_size=cfg.metrics.batch_size,
             num_classes=num_classes, fingerprint=fingerprint(cfg, ["sampler", "guidance"] if guided else ["sampler"]),
             device=next(denoiser.parameters()).device)
    return load_shards(folder)[0]


def generative_metrics(cfg: DictConfig, features):
    """FID, precision/recall, KID and (with the digits classifier's class probabilities) IS; real features kept across resets."""
    m = cfg.metrics
    return GenerativeMetrics(features, reset_real_features=False, kid_subsets=m.kid.subsets, kid_subset_size=m.kid.subset_size,
                             kid_seed=cfg.seed, inception_score=m.features == "digits_classifier")


def digits_metrics(cfg: DictConfig, features, reference, samples):
    """{"<set>/<metric>"} for each named set of uint8 NHWC images against the reference images, whose features are
    extracted once."""
    metrics, (rank, world_size) = generative_metrics(cfg, features), rank_and_world_size()
    batches = lambda a: torch.from_numpy(a[rank::world_size]).permute(0, 3, 1, 2).split(cfg.metrics.batch_size)  # this rank's share
    for batch in batches(reference):
        metrics.update(batch, real=True)
    results = {}
    for prefix, images in samples.items():
        for batch in batches(images):
            metrics.update(batch, real=False)
        results.update({f"{prefix}/{name}": value for name, value in metrics.compute().items()})
        metrics.reset()
    return results


FEATURE_KEYS = ["metrics.features", "metrics.inception_path", "metrics.feature_net", "metrics.feature_steps"]


def feature_network(cfg: DictConfig, images, labels):
    """The metrics' feature extractor, never DG's own networks: the penultimate layer of a digits classifier trained
    on the clean training digits (stage feature_net), or Inception-v3 from the local file metrics.inception_path."""
    m = cfg.metrics
    if m.features == "inception":
        inception = inception_features(m.inception_path)
        return GreyAsRGB(inception) if cfg.score.net.img_channels == 1 else inception
    keys = ["seed", "metrics.feature_net", "metrics.feature_steps", *DIGITS_DATA_KEYS]  # seed: the initial weights
    weights = stage_dir(cfg, "feature_net", keys) / "feature_net.pt"
    if not weights.exists():
        atomic_save(train_feature_classifier(build_network(cfg, m.feature_net), images, labels, m.feature_steps).state_dict(),
                    weights)
    return ClassifierFeatures(_frozen(instantiate(m.feature_net), weights), head="fc")


def sampling_callback(cfg: DictConfig, denoiser, features, real_images, folder):
    """GuidedSamplingCallback: every few epochs, DG samples from the current discriminator, scored against real images."""
    c = cfg.metrics.sampling_callback
    kwargs, run_denoiser = sampler_kwargs(cfg), accelerate(denoiser, build_accel(cfg))

    def sample_fn(discriminator, latents, class_labels, noise):
        return edm_sampler(run_denoiser, latents, class_labels, dg_guidance(cfg, discriminator),
                           randn_like=noise.randn_like, **kwargs)

    shape = (denoiser.img_channels, denoiser.img_resolution, denoiser.img_resolution)
    return GuidedSamplingCallback(
        sample_fn, generative_metrics(cfg, features), shape, c.num_samples, folder / "sampling",
        real_images=torch.from_numpy(real_images).permute(0, 3, 1, 2), every_n_epochs=c.every_n_epochs,
        batch_size=cfg.metrics.batch_size, base_seed=c.seed, num_classes=conditional_classes(cfg), monitor="fid", mode="min")


def best_epoch_record(callback, folder):
    """{sampling/best_epoch, sampling/best_fid}, from this fit or (for a cached stage) from the record it left."""
    record = folder / "best_epoch.json"
    if callback.best_epoch is None:
        return json.loads(record.read_text()) if record.exists() else {}
    found = {"sampling/best_epoch": callback.best_epoch, "sampling/best_fid": callback.best_score}
    if rank_and_world_size()[0] == 0:  # one writer under DDP (every rank's callback holds the same record)
        record.write_text(json.dumps(found))
    return found


def digits_train_keys(cfg: DictConfig):
    """The config keys of the digits train stage (the head's weights and the sampling callback's best pick)."""
    keys = ["seed", "score", "sampler", "data", "trainer.max_epochs", "trainer.max_steps", *FEATURE_KEYS,
            "metrics.sampling_callback", *(f"discriminator.{k}" for k in cfg.discriminator if k != "select")]
    # select=last: guidance settings only change the callback's samples, not the weights used, so DG weight and
    # window sweeps reuse one trained head; select=best: the weights used are the epoch the callback picked by its
    # guided FID, which depends on the guidance.
    return [*keys, "guidance"] if cfg.discriminator.select == "best" else keys


def run_digits(cfg: DictConfig):
    """The digits experiment: pretrain score model and classifier -> fakes -> DG head -> sample with/without DG -> evaluate."""
    d = cfg.data
    train_images, train_labels = load_digits_split("train", d.num_held_out, d.split_seed, d.source, d.num_classes)
    held_out, _ = load_digits_split("held_out", d.num_held_out, d.split_seed, d.source, d.num_classes)
    train = ArraySource(train_images, train_labels, name="digits train split")
    L.seed_everything(cfg.seed, verbose=False)
    stop = DIGITS_STAGES.index(cfg.stage) if cfg.stage != "all" else len(DIGITS_STAGES) - 1
    out_dir, metrics, loggers = Path(cfg.paths.output_dir), {}, build_loggers(cfg)

    denoiser = pretrained_score(cfg, train)
    classifier = pretrained_classifier(cfg, train) if stop >= 1 else None
    if stop >= 2:
        fake_dir = stage_dir(cfg, "generate", [*SCORE_KEYS, "sampler", "data.num_fake"])
        sample_images(cfg, denoiser, fake_dir, d.num_fake, stream_base_seed(cfg.seed, "fakes"),
                      num_classes=conditional_classes(cfg))
        fakes = ArraySource(*load_shards(fake_dir), name=f"fakes in {fake_dir}")
    if stop >= 3:
        features = feature_network(cfg, train_images, train_labels)
        head_net = _with(cfg.discriminator.head, num_classes=conditional_classes(cfg))
        head = build_network(cfg, head_net, cfg.discriminator.seed)
        discriminator = Discriminator(classifier, head)
        train_dir = stage_dir(cfg, "train", digits_train_keys(cfg), inputs=[fake_dir])
        callback = sampling_callback(cfg, denoiser, features, held_out, train_dir)
        discriminator = train_discriminator(cfg, train, fakes, discriminator, loggers, train_dir, callbacks=[callback])
        metrics.update(best_epoch_record(callback, train_dir))
        if cfg.discriminator.select == "best":
            discriminator = _frozen(discriminator, callback.out_dir / BEST_DISCRIMINATOR)
    if stop >= 4:
        m = cfg.metrics
        discriminator.eval().requires_grad_(False)
        classes = conditional_classes(cfg)
        samples = {
            "eval": sample_images(cfg, denoiser, out_dir / "samples_dg", m.num_samples, m.sampling_seed, discriminator,
                                  num_classes=classes),
            "eval_unguided": sample_images(cfg, denoiser, stage_dir(cfg, "sample_unguided", UNGUIDED_KEYS), m.num_samples,
                                           m.sampling_seed, num_classes=classes),
            "eval_floor": train_images[np.random.default_rng(m.sampling_seed).permutation(len(train_images))[:m.num_samples]],
        }
        scores = digits_metrics(cfg, features, held_out, samples)
        metrics.update({k: v for k, v in scores.items() if not k.startswith("eval_floor/") or k.endswith(("/fid", "/kid", "/is"))})
        image_grid(samples, out_dir / "digits_samples.png")
    write_metrics(out_dir, metrics)
    finish_loggers(loggers, metrics)
    return metrics


EDM_STAGES = ("generate", "train", "sample")
FID_REFS_SOURCE = "https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/ (cifar10-32x32.npz, ffhq-64x64.npz)"


class OneHotLabels(torch.nn.Module):
    """An EDM network called with int64 class labels (the convention of the sampler and of DG's discriminator),
    which it receives as EDM's one-hot vectors."""

    def __init__(self, net):
        super().__init__()
        self.net, self.img_channels, self.img_resolution, self.label_dim = (net, net.img_channels, net.img_resolution,
                                                                            net.label_dim)

    def forward(self, x, sigma, class_labels=None):
        """D(x; sigma, one_hot(class_labels)); class_labels None for an unconditional network."""
        return self.net(x, sigma, None if class_labels is None else F.one_hot(class_labels, self.label_dim).to(x.dtype))


def released_files(cfg: DictConfig):
    """{config key: where the released file comes from} for every released file this EDM-G++ run reads."""
    spec = ADM_CLASSIFIERS[cfg.discriminator.classifier.config]
    files = {"score.checkpoint": EDM_SOURCE, "discriminator.classifier.path": spec.source,
             "metrics.fid_reference": FID_REFS_SOURCE}
    if cfg.discriminator.head_path is not None:
        files["discriminator.head_path"] = spec.head_source
    return files


def require_released(cfg: DictConfig, files):
    """Raise a ConfigError for the first {config key: where to get it} whose file or folder does not exist."""
    for key, source in files.items():
        path = OmegaConf.select(cfg, key)
        if path is None or not Path(path).exists():
            raise ConfigError(key, f"the file or folder {path} does not exist", f"download it from {source} into "
                              f"paths.released_dir ({OmegaConf.select(cfg, 'paths.released_dir')}) or set {key}=/path/to/it")


def check_discriminator_config(cfg: DictConfig, released_head):
    """ConfigError for an unknown ADM classifier, a head whose num_classes disagrees with discriminator.conditional, or
    no discriminator to guide with (trainer.max_epochs=0 and no head_path; released_head names the file to give)."""
    d = cfg.discriminator
    if d.classifier.config not in ADM_CLASSIFIERS:
        raise ConfigError("discriminator.classifier.config", f"unknown ADM classifier {d.classifier.config!r}",
                          f"use one of {sorted(ADM_CLASSIFIERS)}")
    if d.conditional != (d.head.num_classes is not None):
        raise ConfigError("discriminator.head.num_classes", f"is {d.head.num_classes} but discriminator.conditional is "
                          f"{d.conditional}", "a conditional head takes num_classes=1000 (the released layout), an "
                          "unconditional one null")
    if cfg.trainer.max_epochs == 0 and d.head_path is None:
        raise ConfigError("trainer.max_epochs", "is 0 (train nothing) but discriminator.head_path is null, so there is no "
                          "discriminator to guide with", f"give a released head (discriminator.head_path=.../{released_head}) "
                          "or train one (trainer.max_epochs > 0)")


def check_edm_config(cfg: DictConfig):
    """ConfigError before any compute for check_discriminator_config's problems, no real data to train on, or a
    missing released file (naming the key, the file and where to get it)."""
    check_discriminator_config(cfg, "discriminator_60.pt")
    if cfg.trainer.max_epochs != 0 and cfg.data.path is None:
        raise ConfigError("data.path", "is null but training the discriminator needs real images",
                          "set data.path to true_data.npz, EDM's dataset zip or an image folder, or guide with a released "
                          "head as it is (discriminator.head_path=... trainer.max_epochs=0)")
    require_released(cfg, released_files(cfg))


def edm_discriminator(cfg: DictConfig):
    """DG's discriminator on the released ADM classifier (frozen) with the released head at discriminator.head_path or a
    new head (discriminator.head, initialised from discriminator.seed); the head is trainable."""
    d = cfg.discriminator
    overrides = OmegaConf.to_container(d.classifier.overrides, resolve=True)
    if d.head_path is not None:
        net = load_dg_discriminator(d.classifier.path, d.head_path, d.classifier.config, d.head.num_classes, **overrides)
    else:
        extractor = load_adm_classifier(d.classifier.path, d.classifier.config, **overrides)
        head = build_network(cfg, d.head, cfg.discriminator.seed)
        net = Discriminator(extractor, head, ADM_CLASSIFIERS[d.classifier.config].time_map)
    net.head.requires_grad_(True)
    return net


def image_metrics(features, images, fid_reference, real=None, batch_size=500, device="cpu"):
    """{fid} of uint8 NHWC images against the (mu, sigma) of fid_reference, plus {precision, recall} against the
    uint8 NHWC real images when given; features computed batch by batch on `device`."""
    metrics = GenerativeMetrics(features, fid_reference=fid_reference, precision_recall=real is not None).to(device)
    rank, world_size = rank_and_world_size()
    for is_real, array in ((True, real), (False, images)):
        array = None if array is None else array[rank::world_size]  # this rank's share; compute() reduces over ranks
        for start in range(0, 0 if array is None else len(array), batch_size):
            batch = torch.from_numpy(array[start:start + batch_size]).to(device).permute(0, 3, 1, 2)
            metrics.update(batch, real=is_real)
    return metrics.compute()


def run_edm(cfg: DictConfig):
    """EDM-G++ on a released EDM network: fakes -> DG head on a released ADM classifier -> samples with and without
    DG from the same seeds at equal NFE -> FID against EDM's reference statistics (+ precision/recall with real data)."""
    check_edm_config(cfg)
    d, m = cfg.discriminator, cfg.metrics
    stop = EDM_STAGES.index(cfg.stage) if cfg.stage != "all" else len(EDM_STAGES) - 1
    out_dir, metrics, loggers = Path(cfg.paths.output_dir), {}, build_loggers(cfg)
    device = torch.device("cuda" if cfg.trainer.accelerator in ("gpu", "cuda") else "cpu")
    denoiser = OneHotLabels(load_edm(cfg.score.checkpoint)).to(device)
    discriminator = edm_discriminator(cfg)
    num_classes = denoiser.label_dim or None
    if d.conditional != (num_classes is not None):
        raise ConfigError("discriminator.conditional", f"is {d.conditional} but the score network {cfg.score.checkpoint} "
                          f"has label_dim={denoiser.label_dim}", "use cifar10_cond_edm_g++ for a conditional network")
    size = (discriminator.feature_extractor.image_size, denoiser.img_resolution)
    if size[0] != size[1]:
        raise ConfigError("discriminator.classifier.config", f"the {d.classifier.config!r} classifier takes {size[0]}x"
                          f"{size[0]} images but the score network makes {size[1]}x{size[1]}", "use cifar10 for 32x32, adm64 for 64x64")
    real = None if cfg.data.path is None else load_source(
        cfg.data.path, "data.path", denoiser.img_resolution, denoiser.img_channels, d.conditional, cfg.data.num_real)
    if real is not None and num_classes and real.labels.max() >= num_classes:
        raise ConfigError("data.path", f"{cfg.data.path} has labels up to {real.labels.max().item()} but the score "
                          f"network has {num_classes} classes", "use the real data of the score network's data set")

    if cfg.trainer.max_epochs != 0:  # else: the released head as it is, no fakes needed
        fake_dir = stage_dir(cfg, "generate", ["seed", "score", "sampler", "data.num_fake"])
        sample_images(cfg, denoiser, fake_dir, cfg.data.num_fake, stream_base_seed(cfg.seed, "fakes"),
                      num_classes=num_classes)
        if stop >= 1:
            keys = ["seed", "score", "sampler", "data", "discriminator", "trainer.max_epochs", "trainer.max_steps"]
            fake = load_source(fake_dir, f"fakes in {fake_dir}", labels=d.conditional)
            discriminator = train_discriminator(cfg, real, fake, discriminator, loggers,
                                                stage_dir(cfg, "train", keys, inputs=[fake_dir]))
    if stop >= 2:
        discriminator.to(device).eval().requires_grad_(False)
        unguided_dir = stage_dir(cfg, "sample_unguided", ["seed", "score", "sampler", "metrics.num_samples",
                                                          "metrics.sampling_seed"])
        samples = {
            "eval": sample_images(cfg, denoiser, out_dir / "samples_dg", m.num_samples, m.sampling_seed, discriminator,
                                  num_classes),
            "eval_unguided": sample_images(cfg, denoiser, unguided_dir, m.num_samples, m.sampling_seed,
                                           num_classes=num_classes),
        }
        features = inception_features(m.inception_path) if m.features == "inception" else instantiate(m.feature_net)
        reference = None if real is None else real.samples[
            np.random.default_rng(m.sampling_seed).permutation(len(real))[:m.num_samples]]
        for prefix, images in samples.items():
            scores = image_metrics(features.to(device), images, m.fid_reference, reference, m.batch_size, device)
            metrics.update({f"{prefix}/{k}": v for k, v in scores.items()})
    write_metrics(out_dir, metrics)
    finish_loggers(loggers, metrics)
    return metrics


def pipelines():
    """{pipeline name: (its stages, its run function)}. The ImageNet pipelines (dg_lightning.imagenet) build on this
    module's helpers, so they are imported here, when a run starts."""
    from dg_lightning.imagenet import IMAGENET_STAGES, run_imagenet, run_imagenet_adm

    return {"toy2d": (TOY_STAGES, run_toy2d), "digits": (DIGITS_STAGES, run_digits), "edm": (EDM_STAGES, run_edm),
            "imagenet": (IMAGENET_STAGES, run_imagenet), "imagenet_adm": (IMAGENET_STAGES, run_imagenet_adm)}


def run(cfg: DictConfig):
    """Validate the config before any compute, then run the experiment's pipeline; returns its metrics."""
    validate(cfg)
    known = pipelines()
    if cfg.pipeline not in known:
        raise ConfigError("pipeline", f"unknown pipeline {cfg.pipeline!r}", f"use one of {sorted(known)}")
    stages, run_pipeline = known[cfg.pipeline]
    if cfg.stage != "all" and cfg.stage not in stages:
        raise ConfigError("stage", f"unknown stage {cfg.stage!r} for pipeline {cfg.pipeline}", f"use all or one of {list(stages)}")
    finished = finished_metrics(cfg)  # a re-launched sweep skips its finished points
    if finished is not None:
        return finished
    launch(cfg)  # trainer.strategy=ddp: every rank runs the pipeline from here
    Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
    if rank_and_world_size()[0] == 0:
        (Path(cfg.paths.output_dir) / "resolved_config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return run_pipeline(cfg)
