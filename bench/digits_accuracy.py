"""Accuracy guard of the fast path on trained networks: the digits experiment's score model, DG discriminator and
metrics network, sampled from the same latents on the plain float32 path and on the fast path (Accel.gpu(), with
--attention as accel.attention).

Reports per sampling seed the FID / precision / recall against the held-out digits of both paths, with and
without DG, and the largest difference between the two paths' uint8 samples. The weights come from a finished
`python run.py experiment=digits_edm_g++` run: --weights is a folder with score_ema.pt, classifier.pt,
discriminator.pt (the train stage's) and feature_net.pt, copied from logs/cache/digits_edm_g++/*/.
Run: python bench/digits_accuracy.py --weights <folder> --seeds 0,1,2
"""

import copy
from dataclasses import replace
from pathlib import Path

import torch
from common import ROOT, machine, parser, report, set_defaults
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dg_lightning.accel import Accel, accelerate, set_backends
from dg_lightning.data import load_digits_split
from dg_lightning.shards import to_uint8
from dg_lightning.guidance import DiscriminatorGuidance
from dg_lightning.metrics import ClassifierFeatures, GenerativeMetrics
from dg_lightning.nets.adm import Discriminator
from dg_lightning.samplers import edm_sampler


def frozen(net, path, device):
    """net with the weights in path, frozen, in eval mode, on device."""
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net.eval().requires_grad_(False).to(device)


def scores(features, reference, images):
    """FID, precision and recall of uint8 NCHW images against the uint8 NCHW reference."""
    metrics = GenerativeMetrics(features).to(reference.device)
    metrics.update(reference, real=True)
    metrics.update(images, real=False)
    return {k: float(v) for k, v in metrics.compute().items()}


def networks_run_as(accel, denoiser, discriminator, dg):
    """(the denoiser, the DG term) run as accel says; compiled networks are compiled in place, so each path needs its
    own copies."""
    guidance = DiscriminatorGuidance(accelerate(discriminator, accel), t_min=dg.t_min, t_max=dg.t_max, clip=dg.clip)
    return accelerate(denoiser, accel), guidance


def main():
    p = parser(__doc__)
    p.add_argument("--weights", required=True)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--compile", default="default", help="torch.compile mode of the fast path ('' for eager)")
    p.add_argument("--attention", default=None, help="accel.attention of the fast path (flash, cudnn, ...)")
    p.add_argument("--num-samples", type=int, default=None, help="fewer samples than the held-out set (smoke runs)")
    args = p.parse_args()
    device, weights = args.device, Path(args.weights)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=digits_edm_g++"])
    denoiser = frozen(instantiate(cfg.score.net), weights / "score_ema.pt", device)
    net = Discriminator(instantiate(cfg.discriminator.classifier.net), instantiate(cfg.discriminator.head))
    discriminator = frozen(net, weights / "discriminator.pt", device)
    features = ClassifierFeatures(frozen(instantiate(cfg.metrics.feature_net), weights / "feature_net.pt", device), head="fc")
    held_out = torch.from_numpy(load_digits_split("held_out", cfg.data.num_held_out, cfg.data.split_seed)[0])
    reference = held_out.permute(0, 3, 1, 2).to(device)
    num_samples = args.num_samples or len(held_out)
    dg = cfg.guidance.dg
    sampler = OmegaConf.to_container(cfg.sampler, resolve=True)
    fast = Accel.gpu(compile=args.compile or None) if device.startswith("cuda") else Accel(autocast="bf16")
    accel = replace(fast, attention=args.attention)
    paths = {"fp32": (Accel(), *networks_run_as(Accel(), denoiser, discriminator, dg)),
             "fast": (accel, *networks_run_as(accel, copy.deepcopy(denoiser), copy.deepcopy(discriminator), dg))}
    result = {"benchmark": "digits_accuracy", "machine": machine(device), "fast": str(accel),
              "num_samples": num_samples, "seeds": {}}
    set_defaults()
    for seed in map(int, args.seeds.split(",")):
        latents = torch.randn(num_samples, 1, 8, 8, generator=torch.Generator().manual_seed(seed)).to(device)
        images, row = {}, {}
        for name, (a, run_denoiser, guidance) in paths.items():
            set_backends(a)
            for guided in (False, True):
                kwargs = {"dg_weight": dg.weight, "dg_weight_2nd": dg.weight_2nd, "dg": guidance} if guided else {}
                x = to_uint8(edm_sampler(run_denoiser, latents, **sampler, **kwargs))
                key = f"{name}/{'dg' if guided else 'no_dg'}"
                images[key] = x
                row[key] = scores(features, reference, x)
        for kind in ("no_dg", "dg"):
            diff = (images[f"fast/{kind}"].int() - images[f"fp32/{kind}"].int()).abs()
            row[f"uint8_max_diff/{kind}"] = int(diff.max())
            row[f"uint8_mean_diff/{kind}"] = float(diff.float().mean())
        result["seeds"][seed] = row
        print(seed, row, flush=True)
    report(args, result)


if __name__ == "__main__":
    main()
