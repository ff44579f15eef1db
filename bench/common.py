"""What the benchmarks share: devices, timing with CUDA synchronisation, the CIFAR-10 EDM-G++ networks, JSON output.

Every benchmark prints one JSON object (and writes it to --out): the machine, the settings, per-variant
figures and ratios against the baseline variant measured in the same run.
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

from netutils import randomized_zeros  # noqa: F401  (re-exported: random weights with every branch active)

from dg_lightning.nets.adm import Discriminator, cifar10_classifier, dg_head
from dg_lightning.nets.edm import VPPrecond


def parser(description):
    """The arguments every benchmark takes: --device, --out, --seed."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    p.add_argument("--seed", type=int, default=0)
    return p


def variant_names(known):
    """An argparse type: a comma-separated list of names of `known` variants; an unknown name is refused before any
    compute, with the known ones."""
    def parse(text):
        names = text.split(",")
        unknown = [name for name in names if name not in known]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown variant(s) {unknown}; choose from {', '.join(known)}")
        return names
    return parse


def machine(device):
    """The device's name and the software versions, for the JSON record."""
    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else platform.processor() or "cpu"
    return {"device": name, "torch": torch.__version__, "threads": torch.get_num_threads()}


def synchronize(device):
    """Wait for the device's queued work (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats):
    """(mean seconds per call, last result) of fn() over `repeats` calls, after the caller's warm-up."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        result = fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats, result


def peak_memory_gib(device):
    """Peak allocated device memory since the last reset, in GiB (None on the CPU)."""
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def reset_peak_memory(device):
    """Start a new peak-memory window."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# The constructor kwargs of edm-cifar10-32x32-uncond-vp.pkl's VPPrecond (EDM's DDPM++ config for CIFAR-10).
EDM_CIFAR10_KWARGS = dict(img_resolution=32, img_channels=3, model_type="SongUNet", augment_dim=9, dropout=0.13,
                          embedding_type="positional", encoder_type="standard", decoder_type="standard",
                          channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2],
                          num_blocks=4)


def edm_cifar10_denoiser(model_channels=128, num_blocks=4):
    """EDM's CIFAR-10 DDPM++ VP denoiser (edm-cifar10-32x32-uncond-vp.pkl's architecture), random weights."""
    return VPPrecond(**{**EDM_CIFAR10_KWARGS, "model_channels": model_channels, "num_blocks": num_blocks})


def cifar10_discriminator(model_channels=128):
    """DG's CIFAR-10 discriminator: the 32x32 ADM classifier's features + the DG head, random weights."""
    extractor = cifar10_classifier(model_channels=model_channels)
    return Discriminator(extractor, dg_head(extractor.feature_channels, model_channels=model_channels))


def edm_cifar10_networks(small, device):
    """The frozen denoiser and DG discriminator of the CIFAR-10 EDM-G++ benchmarks, random weights with every branch
    active (small: narrow ones, for a CPU run)."""
    builds = ((edm_cifar10_denoiser, dict(model_channels=32, num_blocks=1)),
              (cifar10_discriminator, dict(model_channels=64)))
    return tuple(randomized_zeros(build(**(widths if small else {}))).eval().requires_grad_(False).to(device)
                 for build, widths in builds)  # built and drawn one after the other, as before


def report(args, result):
    """Print the result as JSON and write it to args.out when given."""
    text = json.dumps(result, indent=2)
    print(text, flush=True)
    if args.out:
        Path(args.out).write_text(text + "\n")


def set_defaults():
    """Record PyTorch's default TF32 and cuDNN autotuning settings; returns a function that restores them."""
    matmul, cudnn, benchmark = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                                torch.backends.cudnn.benchmark)

    def restore():
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
        torch.backends.cudnn.benchmark = benchmark

    return restore


def per_call_ms(fn, device, repeats=5):
    """Mean milliseconds per call of fn() (after one untimed call)."""
    fn()
    seconds, _ = timed(fn, device, repeats)
    return 1e3 * seconds


KERNEL_CATEGORIES = (  # first match wins: Triton names carry the ops they fuse ("_to_copy"), convolutions say "gemm"
    ("triton", ("triton_",)),
    ("attention", ("sdpa", "fmha", "flash", "attention", "dot_do_o", "convert_dq")),
    ("copy", ("copy", "nchwtonhwc", "nhwctonchw")),
    ("convolution", ("fprop", "dgrad", "wgrad", "conv")),
    ("gemm", ("gemm", "nvjet", "cutlass")),
)


def kernel_category(name):
    """The kind of a device kernel, from its name: triton, attention, copy, convolution, gemm or other."""
    lowered = name.lower()
    return next((kind for kind, marks in KERNEL_CATEGORIES if any(mark in lowered for mark in marks)), "other")


def launch_chain(event, depth=6):
    """The profiled op and its callers, innermost first ("aten::copy_ < aten::contiguous < ...")."""
    names = []
    while event is not None and len(names) < depth:
        names.append(event.name)
        event = event.cpu_parent
    return " < ".join(names)


def kernel_profile(fn, device, count=12):
    """Where the time of one call of fn() goes. On a GPU: the device kernels' total ms and ms by kernel_category, the
    `count` kernels with the most time ([name, ms, calls]), and the `count` ops that launch the most device time
    directly ([op < its callers, input shapes, ms, calls]: which call makes a copy). On a CPU the same by CPU time."""
    on_device = torch.device(device).type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_device else [])
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        fn()
        synchronize(device)
    timed_on = torch.autograd.DeviceType.CUDA if on_device else torch.autograd.DeviceType.CPU
    own_ms = (lambda e: e.self_device_time_total / 1e3) if on_device else (lambda e: e.self_cpu_time_total / 1e3)
    kernels = [e for e in prof.key_averages() if e.device_type == timed_on]
    by_category = {}
    for e in kernels:
        kind = kernel_category(e.key)
        by_category[kind] = by_category.get(kind, 0.0) + own_ms(e)
    launchers = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CPU and own_ms(e) > 0:
            key = (launch_chain(e), str(e.input_shapes)[:160])
            ms, calls = launchers.get(key, (0.0, 0))
            launchers[key] = (ms + own_ms(e), calls + 1)
    return {
        "total_ms": sum(by_category.values()),
        "by_category_ms": dict(sorted(by_category.items(), key=lambda item: -item[1])) if on_device else {},
        "kernels": [[e.key[:140], own_ms(e), e.count] for e in sorted(kernels, key=own_ms, reverse=True)[:count]],
        "launched_by": [[*key, ms, calls] for key, (ms, calls) in sorted(launchers.items(), key=lambda i: -i[1][0])[:count]],
    }
