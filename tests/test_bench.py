"""bench/: the kernel profile sorts the H200's kernel names into the right kinds, a misspelt variant is refused before
any compute, and inductor's planned traffic counts each buffer a kernel touches once, under the right kernel kind."""

import sys
from argparse import ArgumentTypeError
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from common import kernel_category, variant_names  # noqa: E402
from inductor_traffic import call_traffic  # noqa: E402


@pytest.mark.parametrize("name, kind", [  # kernel names from the 2026-11-28 H200 profile of one DG evaluation
    ("triton_poi_fused__to_copy_clone_native_group_norm_silu_72", "triton"),  # fuses a cast: not a copy
    ("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::direct_copy_kernel_cuda", "copy"),
    ("sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64", "convolution"),  # says gemm
    ("void cudnn::cnn::conv2d_grouped_direct_kernel<false, true, false, true>", "convolution"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x64", "attention"),
    ("void cudnn::fusion::convert_dq_to_16bits<true>(void const*, void*)", "attention"),
    ("void cudnn::engines_precompiled::nchwToNhwcKernel<float, float, float, false, true>", "copy"),
    ("nvjet_sm90_tst_128x256_64x4_2x1_v_bz_coopA_TNN", "gemm"),
    ("void at::native::reduce_kernel<512, 1>", "other"),
])
def test_kernel_category(name, kind):
    assert kernel_category(name) == kind


def test_variant_names_refuses_an_unknown_name_and_lists_the_known_ones():
    parse = variant_names({"authors": None, "fast": None})
    assert parse("authors,fast") == ["authors", "fast"]
    with pytest.raises(ArgumentTypeError, match=r"\['fastest'\]; choose from authors, fast"):
        parse("authors,fastest")


def test_planned_traffic_of_a_pointwise_kernel_and_a_convolution():
    """x -> relu(conv3x3(2 x)): per image, one fused kernel reads x and writes 2x (fp32, 4 bytes each), the convolution
    reads 2x and writes its output, and relu, a second fused kernel, reads and writes the output; per call, the
    convolution reads its weight. (channels_last tensors, so that inductor adds no layout conversion.)"""
    x, weight = (torch.randn(shape).to(memory_format=torch.channels_last) for shape in ((4, 3, 8, 8), (5, 3, 3, 3)))
    net = torch.compile(lambda x: F.relu(F.conv2d(2 * x, weight, padding=1)), dynamic=False)
    traffic = call_traffic(lambda b: net(x[:b]), batch=2)
    image_in, image_out = 3 * 8 * 8 * 4, 5 * 8 * 8 * 4
    assert traffic["kernels"] == {"fused": 2, "convolution": 1}
    assert traffic["mb_per_image"]["fused"] * 1e6 == pytest.approx(2 * image_in + 2 * image_out)
    assert traffic["mb_per_image"]["convolution"] * 1e6 == pytest.approx(image_in + image_out)
    assert traffic["mb_per_call"] == pytest.approx({"fused": 0, "convolution": weight.numel() * 4 / 1e6,
                                                    "total": weight.numel() * 4 / 1e6})
