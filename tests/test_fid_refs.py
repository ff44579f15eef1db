"""python -m dg_lightning.fid_refs: FID reference statistics of a real-image folder, read as the experiment reads it."""

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from dg_lightning import fid_refs, sources
from dg_lightning.config import ConfigError, compose_config


def test_reference_statistics_are_the_mean_and_unbiased_covariance_of_the_cropped_images_features(tmp_path):
    photos = np.random.default_rng(0).integers(0, 256, (12, 218, 178, 3), dtype=np.uint8)
    folder = tmp_path / "released" / "img_align_celeba"
    folder.mkdir(parents=True)
    for i, photo in enumerate(photos):
        Image.fromarray(photo).save(folder / f"{i + 1:06d}.png")
    overrides = ["experiment=celeba64_st_g++", "+smoke=st", f"paths.released_dir={tmp_path / 'released'}",
                 "metrics.batch_size=5"]  # batches of 5, 5, 2: the sums run over uneven batches
    fid_refs.main(overrides)

    cfg = compose_config(overrides)
    crops = np.stack([sources.center_crop_resize(p, 140, 64) for p in photos])
    with torch.no_grad():
        features = instantiate(cfg.metrics.feature_net)(torch.from_numpy(crops).permute(0, 3, 1, 2)).double().numpy()
    with np.load(cfg.metrics.fid_reference) as npz:
        assert npz["mu"].dtype == npz["sigma"].dtype == np.float64
        np.testing.assert_allclose(npz["mu"], features.mean(0), rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(npz["sigma"], np.cov(features, rowvar=False), rtol=1e-9, atol=1e-6)
        written = npz["sigma"].copy()
    with pytest.raises(ConfigError, match="metrics.fid_reference.*exists already and is never overwritten"):
        fid_refs.main(overrides)
    with np.load(cfg.metrics.fid_reference) as npz:
        assert np.array_equal(npz["sigma"], written)
