"""EDM-G++ sampling throughput, CIFAR-10 setting (DDPM++ VP denoiser + DG discriminator, random weights), and the
accuracy guard: the fast path's uint8 samples against the plain float32 path's from the same latents.

Variants (each run unguided and with DG, w1 = 2, w2 = 0, tau in [0.01, 1], Heun with --steps steps):
  authors  float64 sampler state, float32 networks, PyTorch's default TF32 settings (as the authors' generate.py)
  fp32     float32 state, float32 networks, no TF32 (the accuracy reference)
  fast     float32 state, Accel.gpu(): bf16 autocast, channels_last, torch.compile (no CUDA graphs), cuDNN autotuning
  fast_noautotune, fast_nocl, fast_graphs: fast without cuDNN autotuning / without channels_last / with CUDA graphs
           (compile mode reduce-overhead)
  fast_flash, fast_cudnn: fast with scaled_dot_product_attention restricted to the flash / cuDNN backend
  fast_cdt  fast with inductor's coordinate-descent tuning of the block sizes of its Triton kernels (the fused
           normalisation and elementwise kernels), which lengthens compilation
Compiled variants get one untimed warm-up batch (compilation); eager ones a 2-step warm-up. Each variant runs its own
copy of the networks (they are compiled in place). With --components, each variant also reports the time of
one denoiser call and of one DG evaluation (log ratio and its input gradient) at sigma = 1, and with --profile the
device kernels that take the most time in each.
The uint8 differences are against the first variant's samples from the same latents.
Run: python bench/edm_sampling.py --batch 512 --variants authors,fp32,fast   (CPU: --batch 4 --steps 3 --small)
"""

import copy
from dataclasses import replace

import torch
from common import (
    edm_cifar10_networks,
    kernel_profile,
    machine,
    parser,
    peak_memory_gib,
    per_call_ms,
    report,
    reset_peak_memory,
    set_defaults,
    timed,
    variant_names,
)

from dg_lightning.accel import Accel, accelerate, set_backends
from dg_lightning.shards import to_uint8
from dg_lightning.guidance import DiscriminatorGuidance
from dg_lightning.samplers import edm_sampler

VARIANTS = {  # sampler state dtype, Accel (None: the plain path under PyTorch's default backend settings)
    "authors": (torch.float64, None),
    "fp32": (torch.float32, Accel()),
    "fast": (torch.float32, Accel.gpu()),
    "fast_noautotune": (torch.float32, replace(Accel.gpu(), cudnn_benchmark=False)),
    "fast_nocl": (torch.float32, replace(Accel.gpu(), channels_last=False)),
    "fast_graphs": (torch.float32, Accel.gpu(compile="reduce-overhead")),
    "fast_flash": (torch.float32, replace(Accel.gpu(), attention="flash")),
    "fast_cudnn": (torch.float32, replace(Accel.gpu(), attention="cudnn")),
    "fast_cdt": (torch.float32, Accel.gpu()),
}
INDUCTOR_OPTIONS = {"fast_cdt": {"coordinate_descent_tuning": True}}  # torch._inductor.config while the variant runs


def uint8_difference(a, b):
    """Max and mean |a - b| in uint8 levels, and the fraction of values that differ by more than one level."""
    d = (to_uint8(a).int() - to_uint8(b).int()).abs()
    return {"max": int(d.max()), "mean": float(d.float().mean()), "frac_gt1": float((d > 1).float().mean())}


def component_calls(denoiser, guidance, x):
    """The two calls a guided batch is made of, at x and sigma = 1: one denoiser call and one DG evaluation (value and
    input gradient)."""
    sigma = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
    return {"denoiser": lambda: denoiser(x, sigma), "dg_value_and_grad": lambda: guidance.edm(x, 1.0)}


def components(denoiser, guidance, x, device, profile):
    """Milliseconds of one denoiser call and one DG evaluation (component_calls; and with `profile` their device
    kernels, see kernel_profile)."""
    calls = component_calls(denoiser, guidance, x)
    figures = {f"{name}_ms": per_call_ms(fn, device) for name, fn in calls.items()}
    if profile:
        figures["kernel_profile"] = {name: kernel_profile(fn, device) for name, fn in calls.items()}
    return figures


def run_variant(name, args, denoiser, discriminator, latents, samples, torch_defaults):
    """The figures of one variant: img/s unguided and with DG (and the components); its uint8 samples go into
    samples[(name, "unguided" | "guided")]."""
    device, dtype, accel = args.device, *VARIANTS[name]
    settings = dict(num_steps=args.steps, sigma_min=0.002, sigma_max=80.0)
    set_backends(accel or Accel())
    if accel is None:
        accel = Accel()
        torch_defaults()
    run_denoiser = accelerate(copy.deepcopy(denoiser), accel)
    guidance = DiscriminatorGuidance(accelerate(copy.deepcopy(discriminator), accel), t_min=0.01, t_max=1.0)
    figures = {}
    for guided in (False, True):
        kwargs = dict(settings, dtype=dtype, dg=guidance if guided else None, dg_weight=2.0 if guided else 0.0)

        def sample(kwargs=kwargs, run_denoiser=run_denoiser):
            return edm_sampler(run_denoiser, latents, **kwargs)

        reset_peak_memory(device)
        if accel.compile is None:
            warmup, _ = timed(lambda k=kwargs, d=run_denoiser: edm_sampler(d, latents, **dict(k, num_steps=2)), device, 1)
        else:
            warmup, _ = timed(sample, device, 1)  # includes compilation
        seconds, x = timed(sample, device, args.repeats)
        key = "guided" if guided else "unguided"
        samples[(name, key)] = x.float().cpu()
        figures[key] = {"img_per_s": args.batch / seconds, "s_per_batch": seconds, "warmup_s": warmup,
                        "peak_gib": peak_memory_gib(device)}
        print(name, key, figures[key], flush=True)  # kept in the log should a time limit stop the run
    figures["dg_overhead"] = figures["unguided"]["img_per_s"] / figures["guided"]["img_per_s"]
    if args.components:
        figures["components"] = components(run_denoiser, guidance, latents.to(dtype), device, args.profile)
    print(name, figures, flush=True)
    return figures


def main():
    p = parser(__doc__)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--steps", type=int, default=18)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--variants", type=variant_names(VARIANTS), default="authors,fp32,fast")
    p.add_argument("--small", action="store_true", help="narrow networks, for a CPU smoke run")
    p.add_argument("--components", action="store_true", help="also time one denoiser call and one DG evaluation")
    p.add_argument("--profile", action="store_true", help="with --components: the top device kernels of each")
    args = p.parse_args()
    device, torch_defaults = args.device, set_defaults()
    torch.manual_seed(args.seed)
    denoiser, discriminator = edm_cifar10_networks(args.small, device)
    latents = torch.randn(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(args.seed)).to(device)

    result = {"benchmark": "edm_sampling", "machine": machine(device), "batch": args.batch, "steps": args.steps,
              "nfe": 2 * args.steps - 1, "variants": {}}
    samples = {}
    for name in args.variants:
        with torch._inductor.config.patch(INDUCTOR_OPTIONS.get(name, {})):
            result["variants"][name] = run_variant(name, args, denoiser, discriminator, latents, samples, torch_defaults)

    base = args.variants[0]
    for name, figures in result["variants"].items():
        for key in ("unguided", "guided"):
            figures[key]["speedup_vs_" + base] = figures[key]["img_per_s"] / result["variants"][base][key]["img_per_s"]
    result["uint8_difference_vs_" + base] = {
        f"{name}/{key}": uint8_difference(x, samples[(base, key)]) for (name, key), x in samples.items() if name != base}
    report(args, result)


if __name__ == "__main__":
    main()
