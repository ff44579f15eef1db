"""Inductor's planned memory traffic of the compiled CIFAR-10 EDM-G++ networks (random weights), per image: the bytes
that the kernels of one denoiser call and of one DG evaluation (log ratio and its input gradient) read and write.

The bytes are split by kernel kind: the fused kernels that inductor generates (Triton on a GPU, C++ on the CPU: the
normalisations and elementwise work, which are bound by memory bandwidth on a GPU) and the extern kernels it calls
(convolution, matmul, attention). This is inductor's own count (`SchedulerNode.get_read_write_buffers_sizes`, what
TORCH_LOGS=inductor_metrics logs): every buffer that a kernel touches counts once, at most its size. It measures on any
device what a change to the networks does to the traffic of the fused kernels, without a GPU. It is a plan, not a
timing, and it leans on inductor internals: compare variants, or commits, within one run and one torch version.

Variants: fp32 (compiled float32, contiguous layout: the baseline), fast (Accel.gpu(): bf16 autocast, channels_last),
fast_nocl (fast without channels_last).
Run: python bench/inductor_traffic.py --batch 4   (CPU: add --small for narrow networks)
"""

import contextlib
import copy
from dataclasses import replace
from unittest.mock import patch

import torch
import torch._inductor.config
from common import cifar10_discriminator, edm_cifar10_denoiser, machine, parser, randomized_zeros, report, variant_names
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


@contextlib.contextmanager
def planned_traffic():
    """Within the block, each graph that inductor compiles adds its planned bytes by kernel_kind, and its kernel counts,
    to the yielded list. Inductor's caches are off, so every graph is compiled (a cached graph is never scheduled)."""
    graphs = []
    original = GraphLowering.codegen

    def codegen(self):
        result = original(self)
        nodes = [(kernel_kind(node), node.get_read_write_buffers_sizes()) for node in self.scheduler.nodes]
        nodes = [(kind, size) for kind, size in nodes if size]
        graphs.append({"bytes": {kind: sum(s for k, s in nodes if k == kind) for kind, _ in nodes},
                       "kernels": {kind: sum(k == kind for k, _ in nodes) for kind, _ in nodes}})
        return result

    with (patch.object(GraphLowering, "codegen", codegen), torch._inductor.config.patch(fx_graph_cache=False),
          torch._functorch.config.patch(enable_autograd_cache=False)):
        yield graphs


def call_traffic(fn, batch):
    """MB per image by kernel kind (and their total), and the kernel counts, of the graphs compiled by the first fn()."""
    with planned_traffic() as graphs:
        fn()
    mb, kernels = {}, {}
    for graph in graphs:
        for kind, size in graph["bytes"].items():
            mb[kind] = mb.get(kind, 0.0) + size / batch / 1e6
        for kind, count in graph["kernels"].items():
            kernels[kind] = kernels.get(kind, 0) + count
    return {"graphs": len(graphs), "mb_per_image": dict(mb, total=sum(mb.values())), "kernels": kernels}


def main():
    p = parser(__doc__)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--variants", type=variant_names(VARIANTS), default="fp32,fast")
    p.add_argument("--small", action="store_true", help="narrow networks, for a quick run")
    args = p.parse_args()
    device = args.device
    torch.manual_seed(args.seed)
    widths = dict(model_channels=32, num_blocks=1) if args.small else {}
    denoiser = randomized_zeros(edm_cifar10_denoiser(**widths)).eval().requires_grad_(False).to(device)
    discriminator = randomized_zeros(cifar10_discriminator(**({"model_channels": 64} if args.small else {})))
    discriminator = discriminator.eval().requires_grad_(False).to(device)
    x = torch.randn(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(args.seed)).to(device)

    result = {"benchmark": "inductor_traffic", "machine": machine(device), "batch": args.batch, "variants": {}}
    for name in args.variants:
        accel = VARIANTS[name]
        guidance = DiscriminatorGuidance(accelerate(copy.deepcopy(discriminator), accel), t_min=0.01, t_max=1.0)
        calls = component_calls(accelerate(copy.deepcopy(denoiser), accel), guidance, x)
        result["variants"][name] = {call: call_traffic(fn, args.batch) for call, fn in calls.items()}
        print(name, result["variants"][name], flush=True)
    base = result["variants"][args.variants[0]]
    for figures in result["variants"].values():
        for call, traffic in figures.items():
            for kind in ("fused", "total"):
                traffic[f"{kind}_vs_{args.variants[0]}"] = traffic["mb_per_image"][kind] / base[call]["mb_per_image"][kind]
    report(args, result)


if __name__ == "__main__":
    main()
