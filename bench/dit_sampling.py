"""DiT-XL/2-G++ sampling: seconds per DDPM step with classifier-free guidance, with and without DG (random weights).

The batch is --batch images (2x rows through DiT for CFG 1.25 / 3.0 on 3 of 4 latent channels); DG uses the
conditional latent discriminator (DG_imagenet's 4x32x32 ADM classifier features + DG head, 1000 classes) on every
step (dg_switch_step=-1, so each timed step pays for it). --steps respaced steps are timed after one warm-up run.
Variants: authors (float32 with TF32, eager, as DiT's sample.py) and fast (Accel.gpu(): bf16 autocast,
channels_last for the discriminator's convolutions, torch.compile).
Run: python bench/dit_sampling.py --batch 64   (CPU: --small --batch 2 --steps 2)
"""

import copy

import torch
from common import (
    machine,
    parser,
    peak_memory_gib,
    randomized_zeros,
    report,
    reset_peak_memory,
    timed,
    variant_names,
)

from dg_lightning.accel import Accel, accelerate, set_backends
from dg_lightning.ddpm import DDPMSchedule, ddpm_sampler
from dg_lightning.guidance import DiscriminatorGuidance
from dg_lightning.nets.adm import Discriminator, dg_head, latent_classifier
from dg_lightning.nets.dit import DiT, DiT_XL_2

VARIANTS = {"authors": Accel(tf32=True), "fast": Accel.gpu(), "fast_graphs": Accel.gpu(compile="reduce-overhead")}


def main():
    p = parser(__doc__)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--variants", type=variant_names(VARIANTS), default="authors,fast")
    p.add_argument("--small", action="store_true", help="a 2-block DiT and a narrow discriminator, for a CPU smoke run")
    args = p.parse_args()
    device = args.device
    torch.manual_seed(args.seed)
    dit = DiT(depth=2, hidden_size=128, patch_size=2, num_heads=2) if args.small else DiT_XL_2()
    dit = randomized_zeros(dit).eval().requires_grad_(False).to(device)
    widths = {"model_channels": 64} if args.small else {}
    extractor = latent_classifier(**widths)
    discriminator = Discriminator(extractor, dg_head(extractor.feature_channels, num_classes=1000, **widths))
    discriminator = randomized_zeros(discriminator).eval().requires_grad_(False).to(device)
    generator = torch.Generator().manual_seed(args.seed)
    latents = torch.randn(args.batch, 4, 32, 32, generator=generator).to(device)
    labels = torch.randint(0, 1000, (args.batch,), generator=generator).to(device)
    schedule = DDPMSchedule(respacing=str(args.steps))
    settings = {"class_labels": labels, "schedule": schedule, "null_label": 1000, "cfg_scale": 1.25,
                "cfg_scale_late": 3.0, "dg_switch_step": -1}

    result = {"benchmark": "dit_sampling", "machine": machine(device), "batch": args.batch,
              "rows_through_dit": 2 * args.batch, "steps_timed": args.steps, "variants": {}}
    for name in args.variants:
        accel = VARIANTS[name]
        set_backends(accel)
        model_fn = accelerate(copy.deepcopy(dit), accel)  # each variant its own copy: compiling is in place
        dg = DiscriminatorGuidance(accelerate(copy.deepcopy(discriminator), accel))
        figures = {}
        for guided in (False, True):
            kwargs = dict(settings, dg=dg if guided else None, dg_weight=1.0 if guided else 0.0)

            def sample(kwargs=kwargs, model_fn=model_fn):
                return ddpm_sampler(model_fn, latents, **kwargs)

            reset_peak_memory(device)
            warmup, _ = timed(sample, device, 1)
            seconds, _ = timed(sample, device, 1)
            per_step = seconds / args.steps
            figures["dg" if guided else "no_dg"] = {
                "s_per_step": per_step, "img_per_s_at_250_steps": args.batch / (250 * per_step),
                "first_run_s": warmup, "peak_gib": peak_memory_gib(device)}
        figures["dg_overhead"] = figures["dg"]["s_per_step"] / figures["no_dg"]["s_per_step"]
        result["variants"][name] = figures
        print(name, figures, flush=True)
    base = result["variants"][args.variants[0]]
    for figures in result["variants"].values():
        for key in ("no_dg", "dg"):
            figures[key]["speedup"] = base[key]["s_per_step"] / figures[key]["s_per_step"]
    report(args, result)


if __name__ == "__main__":
    main()
