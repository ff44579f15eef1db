"""discriminator.seed: the DG head's own seed. Its default ${seed} follows the run's seed (the same head, bit for bit, in
the same train cache folder as the seed given explicitly); another value changes the head alone (the same fakes), gets a
train cache folder of its own, and a bad value stops the run before any compute."""

import pytest
import torch
from test_checkpoints import write_edm_pickle  # noqa: F401  (fixture: EDM-format pickles)
from test_edm_pipeline import write_released_files

from dg_lightning.config import ConfigError
from dg_lightning.pipelines import run
from dg_lightning.released import dg_discriminator

TINY_TOY = ["logger=csv", "callbacks=none", "~callbacks.sampling", "stage=train", "data.num_real=256", "data.num_fake=256", "data.batch_size=64",
            "sampler.num_steps=4", "trainer.max_steps=10", "discriminator.net.width=16", "discriminator.net.depth=2",
            "discriminator.net.time_dim=8"]


def test_head_seed_follows_the_run_seed_unless_set(compose_cfg):
    assert compose_cfg("seed=7").discriminator.seed == 7
    assert compose_cfg("seed=7", "discriminator.seed=3").discriminator.seed == 3
    assert compose_cfg("seed=7", "discriminator.seed=0").discriminator.seed == 0


@pytest.mark.parametrize("value", ["-1", "1.5", "abc", "true", "null", str(2**32)])
def test_a_bad_head_seed_is_refused_before_any_compute(compose_cfg, tmp_path, value):
    cfg = compose_cfg(*TINY_TOY, f"discriminator.seed={value}")
    with pytest.raises(ConfigError, match=r"config key 'discriminator.seed': must be an integer in \[0, 2\*\*32 - 1\]"):
        run(cfg)
    assert not (tmp_path / "logs" / "cache").exists()


def toy_train(compose_cfg, tmp_path, name, *overrides):
    """Run the toy pipeline up to its train stage in a cache of its own; (fakes, head weights, train folder name)."""
    cache = tmp_path / name
    run(compose_cfg(*TINY_TOY, f"paths.cache_dir={cache}", f"paths.output_dir={tmp_path}/out_{name}", *overrides))
    (fakes,), (train,) = (cache / "toy2d").glob("generate-*"), (cache / "toy2d").glob("train-*")
    return (torch.load(fakes / "fakes.pt", weights_only=True), torch.load(train / "discriminator.pt", weights_only=True),
            fakes.name, train.name)


def test_toy_default_head_seed_gives_the_run_seed_head_and_another_seed_changes_the_head_alone(compose_cfg, tmp_path):
    fakes, head, fakes_key, train_key = toy_train(compose_cfg, tmp_path, "default", "seed=0")
    same_fakes, same_head, _, same_train_key = toy_train(compose_cfg, tmp_path, "zero", "seed=0", "discriminator.seed=0")
    other_fakes, other_head, other_fakes_key, other_train_key = toy_train(compose_cfg, tmp_path, "one", "seed=0",
                                                                          "discriminator.seed=1")
    assert torch.equal(same_fakes, fakes) and torch.equal(other_fakes, fakes) and other_fakes_key == fakes_key
    assert head.keys() == same_head.keys() == other_head.keys()
    assert all(torch.equal(same_head[k], v) for k, v in head.items())  # default = seed: bit-identical heads
    assert same_train_key == train_key  # ... in the same train cache folder
    assert any(not torch.equal(other_head[k], v) for k, v in head.items())  # another head seed: another head
    assert other_train_key != train_key  # ... in a train cache folder of its own


def test_edm_head_is_initialised_from_the_head_seed(compose_cfg, tmp_path, write_edm_pickle):  # noqa: F811
    released = write_released_files(tmp_path / "released", "cifar10_edm_g++", write_edm_pickle)
    base = ["experiment=cifar10_edm_g++", "+smoke=edm", f"paths.released_dir={released}", "seed=0"]
    heads = {seed: dg_discriminator(compose_cfg(*base, f"discriminator.seed={seed}")).head.state_dict()
             for seed in ("${seed}", "0", "1")}
    assert all(torch.equal(heads["0"][k], v) for k, v in heads["${seed}"].items())
    assert any(not torch.equal(heads["1"][k], v) for k, v in heads["${seed}"].items())
