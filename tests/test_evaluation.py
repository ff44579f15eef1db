"""ADM-style evaluation: the reference batch's form, FID / sFID / P / R limits, ADM's split Inception Score, the
Inception's three outputs (pool, NHWC spatial, unbiased logits), and the evaluator's sample-batch export."""

import numpy as np
import pytest
import torch
from netutils import write_random_inception_weights

from dg_lightning.evaluation import (
    ADMInception,
    PooledPixels,
    evaluate,
    export_samples,
    load_reference_batch,
)
from dg_lightning.metrics import InceptionScore


def reference_file(path, images):
    with torch.no_grad():
        pool, spatial, _ = PooledPixels()(torch.from_numpy(images).permute(0, 3, 1, 2))
    pool, spatial = pool.double().numpy(), spatial.double().numpy()
    np.savez(path, arr_0=images, mu=pool.mean(0), sigma=np.cov(pool, rowvar=False), mu_s=spatial.mean(0),
             sigma_s=np.cov(spatial, rowvar=False))
    return path


def images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)


def test_samples_equal_to_the_reference_score_zero_fid_and_full_precision_recall(tmp_path):
    real = images(80, 0)
    reference = load_reference_batch(reference_file(tmp_path / "ref.npz", real), 48, 64)
    same = evaluate(PooledPixels(), real, reference, batch_size=32)
    assert same["fid"] == pytest.approx(0, abs=1e-6) and same["sfid"] == pytest.approx(0, abs=1e-6)
    assert same["precision"] == same["recall"] == 1.0
    other = evaluate(PooledPixels(), (real // 2).astype(np.uint8), reference, batch_size=32)
    assert other["fid"] > 1e-3 and other["sfid"] > 1e-3 and other["precision"] < 1


def test_inception_score_is_the_mean_over_splits():
    confident = torch.eye(4) * 50  # IS = 4 (one sample per class, certain)
    uniform = torch.zeros(4, 4)    # IS = 1
    for logits, expected in ((torch.cat([confident, uniform]), 2.5), (confident, 4.0)):
        metric = InceptionScore(split_size=4)
        metric.update(logits)
        assert metric.compute().item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("change, message", [
    (lambda a: a.pop("mu_s"), r"lacks \['mu_s'\]"),
    (lambda a: a.update(sigma=np.eye(3)), r"sigma \(3, 3\)"),
    (lambda a: a.update(arr_0=a["arr_0"].astype(np.float32)), r"arr_0 float32"),
])
def test_a_bad_reference_batch_names_the_problem(tmp_path, change, message):
    path = reference_file(tmp_path / "ref.npz", images(10, 0))
    arrays = dict(np.load(path))
    change(arrays)
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=message):
        load_reference_batch(path, 48, 64)
    with pytest.raises(FileNotFoundError, match=r"VIRTUAL_imagenet256_labeled.npz"):
        load_reference_batch(tmp_path / "missing.npz")


def test_adm_inception_outputs_pool_nhwc_spatial_and_unbiased_logits(tmp_path, monkeypatch):
    weights, _ = write_random_inception_weights(tmp_path)
    net = ADMInception(weights)
    seen = []
    net.net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.append(o))
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pool, spatial, logits = net(x)
    assert pool.shape == (2, 2048) and spatial.shape == (2, 2023) and logits.shape == (2, 1008)
    (branch,) = seen
    assert branch.shape == (2, 192, 17, 17)
    # NHWC order: position (h, w) first, then the 7 channels.
    assert torch.equal(spatial.view(2, 17, 17, 7), branch[:, :7].permute(0, 2, 3, 1))
    assert torch.allclose(logits, pool @ net.net.fc.weight.T)


def test_export_writes_the_evaluator_sample_batch(tmp_path):
    samples, labels = images(5, 1), np.arange(5) * 100
    path = export_samples(tmp_path / "samples.npz", samples, labels)
    with np.load(path) as npz:
        assert sorted(npz.files) == ["arr_0", "arr_1"]
        assert np.array_equal(npz["arr_0"], samples) and npz["arr_1"].dtype == np.int64
        assert np.array_equal(npz["arr_1"], labels)
    with pytest.raises(ValueError, match=r"uint8 NHWC RGB"):
        export_samples(tmp_path / "bad.npz", samples.astype(np.float32))
