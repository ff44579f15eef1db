"""Inductor's planned memory traffic of the compiled CIFAR-10 EDM-G++ networks (random weights), per image: the bytes
that the kernels of one denoiser call and of one DG evaluation (log ratio and its input gradient) read and write.

The bytes are split by kernel kind: the fused kernels that inductor generates (Triton on a GPU, C++ on the CPU: the
normalisations and elementwise work, which are bound by memory bandwidth on a GPU) and the extern kernels it calls
(convolution, matmul, attention). This is inductor's own count (`SchedulerNode.get_read_write_buffers_sizes`, what
TORCH_LOGS=inductor_metrics logs): every buffer that a kernel touches counts once, at most its size. Each call is
compiled at --batch and at twice that: the difference is the traffic per image (activations), the rest the traffic
per call (weights, and their bf16 casts under autocast), which a small batch would otherwise spread over few images.
It measures on any device what a change to the networks does to the traffic of the fused kernels, without a GPU. It is
a plan, not a timing, and it leans on inductor internals: compare variants, or commits, within one torch version.

Variants: fp32 (compiled float32, contiguous layout: the baseline), fast (Accel.gpu(): bf16 autocast, channels_last),
fast_nocl (fast without channels_last).
Run: python bench/inductor_traffic.py --batch 2   (CPU: add --small for narrow networks)
"""

import copy
from dataclasses import replace
from functools import partial
from unittest.mock import patch

import torch
import torch._inductor.config
from common import edm_cifar10_networks, machine, parser, report, variant_names
from edm_sampling import component_calls
from torch._inductor.graph import GraphLowering
from torch._inductor.scheduler import ExternKernelSchedulerNode

from dg_lightning.accel import Accel, accelerate
from dg_lightning.guidance import DiscriminatorGuidance

VARIANTS = {"fp32": Accel(compile="default"), "fast": Accel.gpu(), "fast_nocl": replace(Accel.gpu(), channels_last=False)}
EXTERN_KINDS = (("attention", "scaled_dot_product"), ("convolution", "convolution"), ("matmul", "mm"))


def kernel_kind(node):
    """fused (a kernel inductor generates) or the kind of extern kernel it calls: attention, convolution, matmul, other."""
    if not isinstance(node, ExternKernelSchedulerNode):
        return "fused"
    name = str(getattr(node.node, "python_kernel_name", None) or getattr(node.node, "op_overload", ""))
    return next((kind for kind, mark in EXTERN_KINDS if mark in name), "other")


def planned_bytes(fn):
    """Planned bytes by kernel_kind, and kernel counts, of the graphs that inductor compiles during fn(). Inductor's
    caches are off, so every graph is compiled (a cached graph is never scheduled)."""
    total, kernels = {}, {}
    original = GraphLowering.codegen

    def codegen(self):
        result = original(self)
        for node in self.scheduler.nodes:
            kind, size = kernel_kind(node), node.get_read_write_buffers_sizes()
            if size:
                total[kind], kernels[kind] = total.get(kind, 0) + size, kernels.get(kind, 0) + 1
        return result

    with (patch.object(GraphLowering, "codegen", codegen), torch._inductor.config.patch(fx_graph_cache=False),
          torch._functorch.config.patch(enable_autograd_cache=False)):
        fn()
    return total, kernels


def call_traffic(call_at, batch):
    """MB per image and MB per call by kernel kind (and their totals), and the kernel counts, of a call that
    call_at(b) makes at batch b: the traffic grows linearly with the batch, measured at batch and 2 * batch."""
    (small, kernels), (large, _) = (planned_bytes(lambda b=b: call_at(b)) for b in (batch, 2 * batch))
    per_image = {kind: (large.get(kind, 0) - small[kind]) / batch / 1e6 for kind in small}
    per_call = {kind: (2 * small[kind] - large.get(kind, 0)) / 1e6 for kind in small}
    return {"mb_per_image": dict(per_image, total=sum(per_image.values())),
            "mb_per_call": dict(per_call, total=sum(per_call.values())), "kernels": kernels}


def main():
    p = parser(__doc__)
    p.add_argument("--batch", type=int, default=2, help="compiled at this batch and at twice it")
    p.add_argument("--variants", type=variant_names(VARIANTS), default="fp32,fast")
    p.add_argument("--small", action="store_true", help="narrow networks, for a quick run")
    args = p.parse_args()
    device = args.device
    torch.manual_seed(args.seed)
    denoiser, discriminator = edm_cifar10_networks(args.small, device)
    latents = torch.randn(2 * args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(args.seed)).to(device)

    result = {"benchmark": "inductor_traffic", "machine": machine(device), "batch": args.batch, "variants": {}}
    for name in args.variants:
        accel = VARIANTS[name]
        guidance = DiscriminatorGuidance(accelerate(copy.deepcopy(discriminator), accel), t_min=0.01, t_max=1.0)
        denoiser_copy = accelerate(copy.deepcopy(denoiser), accel)

        def call_at(b, call):
            return component_calls(denoiser_copy, guidance, latents[:b])[call]()

        result["variants"][name] = {}
        for call in ("denoiser", "dg_value_and_grad"):  # minutes of compiling each on a CPU
            print(f"{name}: compiling {call} at batch {args.batch} and {2 * args.batch}", flush=True)
            result["variants"][name][call] = call_traffic(partial(call_at, call=call), args.batch)
        print(name, result["variants"][name], flush=True)
    base = result["variants"][args.variants[0]]
    for figures in result["variants"].values():
        for call, traffic in figures.items():
            for kind in ("fused", "total"):
                traffic[f"{kind}_vs_{args.variants[0]}"] = traffic["mb_per_image"][kind] / base[call]["mb_per_image"][kind]
    report(args, result)


if __name__ == "__main__":
    main()
