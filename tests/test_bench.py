"""bench/common.py: the kernel profile sorts the H200's kernel names into the right kinds, and a misspelt variant is
refused before any compute."""

import sys
from argparse import ArgumentTypeError
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from common import kernel_category, variant_names  # noqa: E402


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
