"""bench/: the kernel profile sorts the H200's kernel names into the right kinds, a misspelt variant is refused before
any compute, inductor's planned traffic counts each buffer a kernel touches once, under the right kernel kind, and the
recipe benchmark counts each stage's images as the run made them and projects the paper's counts from its rates."""

import json
import os
import subprocess
import sys
from argparse import ArgumentTypeError
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from common import kernel_category, variant_names  # noqa: E402
from conftest import HANG_GUARD_S  # noqa: E402
from inductor_traffic import call_traffic  # noqa: E402

BENCH = Path(__file__).resolve().parents[1] / "bench"


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


@pytest.mark.slow
def test_recipe_counts_each_stages_images_and_projects_the_papers_counts_from_their_rates(tmp_path):
    """bench/recipe.py --small: the stages of the EDM pipeline, each with the images it made (the train stage's from
    the run's own step count), and the projection sum(count / rate) at the paper's counts, ours and the authors'."""
    out = tmp_path / "recipe.json"
    subprocess.run([sys.executable, str(BENCH / "recipe.py"), "--small", "--work", str(tmp_path / "work"),
                    "--num-fake", "24", "--num-held-out", "4", "--num-samples", "12", "--batch", "6",
                    "--train-batch", "8", "--out", str(out)], check=True, capture_output=True, timeout=HANG_GUARD_S,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    result = json.loads(out.read_text())
    stages = result["stages"]
    assert list(stages) == ["load", "generate", "train", "sample_unguided", "sample"]
    assert not any(stage["cached"] for stage in stages.values())
    assert [stages[name]["images"] for name in ("generate", "sample_unguided", "sample")] == [28, 12, 12]
    (train,) = (tmp_path / "work" / "logs" / "cache" / "cifar10_edm_g++").glob("train-*")
    steps = torch.load(train / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert stages["train"]["images"] == steps * 8 == 2 * (24 // 4) * 8  # 2 epochs of 24 pairs in batches of 4 + 4
    for stage in stages.values():
        assert stage["images_per_second"] == (pytest.approx(stage["images"] / stage["seconds"], rel=1e-12)
                                              if stage["images"] else None)
    rate = {name: stages[name]["images_per_second"] for name in ("generate", "train", "sample_unguided", "sample")}
    projected = result["projected_seconds"]
    assert projected["ours"] == pytest.approx({
        "generate": 50_000 / rate["generate"], "train": 60 * (50_000 // 4) * 8 / rate["train"],
        "sample_unguided": 50_000 / rate["sample_unguided"], "sample": 50_000 / rate["sample"],
        "load": stages["load"]["seconds"]}, rel=1e-12)
    assert projected["callback"] == pytest.approx(6 * 10_000 / rate["sample"], rel=1e-12)  # every 10 of 60 epochs
    authors = 50_000 / 92 + 60 * (50_000 // 4) * 8 / 2590 + 50_000 / 92 + 50_000 / 45
    assert projected["authors_total"] == pytest.approx(authors, rel=1e-12)
    assert result["speedup_over_authors"] == pytest.approx(authors / sum(projected["ours"].values()), rel=1e-12)
