"""Config validation: every bad setting is refused before any compute, naming the key."""
import json
import os

import pytest

from conftest import tiny_config
from sftmix_jax import main
from sftmix_jax import config as config_lib


@pytest.mark.parametrize("overrides,devices,message", [
    ({"train.batch_size": 15}, 1, r"SFTMix needs an even number of rows"),
    ({"train.batch_size": 12}, 8, r"config.train.batch_size=12 .* divisible by the data-parallel size data\*fsdp=8"),
    ({"train.batch_size": 16, "train.grad_accum": 3}, 1, r"multiple of config.train.grad_accum=3"),
    ({"mesh.fsdp": 3}, 8, r"8 devices cannot be split into data=-1 fsdp=3 tensor=1"),
    ({"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 1}, 8, r"data\*fsdp\*tensor = 2\*2\*1 = 4 but there are 8 devices"),
    ({"sftmix.mu": -0.1}, 1, r"config.sftmix.mu=-0.1 must be >= 0"),
    ({"sftmix.alpha": 0.0}, 1, r"config.sftmix.alpha=0.0 must be > 0"),
    ({"sftmix.ntp": False}, 1, r"config.sftmix.ntp=False \(Mixup only\) needs config.sftmix.mu=1"),
    ({"reference.checkpoints": 1}, 1, r"config.reference.checkpoints=1: the confidence replay needs >= 2"),
    ({"data.fields.output": ""}, 1, r"config.data.fields.output is empty"),
    ({"data.format": "csv"}, 1, r"config.data.format='csv'"),
    ({"confidence.split": "median"}, 1, r"config.confidence.split='median'"),
    ({"evaluate.batch_size": 12}, 8, r"config.evaluate.batch_size=12 must be divisible"),
    ({"model.attention": "flash"}, 1, r"config.model.attention='flash': use one of auto, blocked, xla, cudnn, splash"),
    ({"model.remat": "dot"}, 1, r"config.model.remat='dot': use one of none, full, dots"),
    ({"model.source": "pretrain", "data.source": "x.json"}, 1, r"config.model.source='pretrain' .* needs"),
])
def test_bad_config_is_refused_naming_the_key(overrides, devices, message):
    with pytest.raises(ValueError, match=message):
        config_lib.validate(tiny_config(**overrides), config_lib.STAGES, devices)


def test_good_config_passes():
    config_lib.validate(tiny_config(), config_lib.STAGES, 8)
    config_lib.validate(tiny_config(**{"mesh.fsdp": 4, "mesh.tensor": 2}), config_lib.STAGES, 8)


def test_named_configs_pass():
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("replica", os.path.join(ROOT, "configs", "replica.py"))
    replica = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(replica)
    for name in replica.RUNS:
        config_lib.validate(replica.get_config(name), config_lib.STAGES, 8)
    assert replica.get_config("qwen25_05b_alpaca,rows=64").data.num_examples == 64
    with pytest.raises(ValueError, match="unknown replica run 'qwen'"):
        replica.get_config("qwen")
    config_lib.validate(tiny_config(**{"model.source": "pretrain"}), config_lib.STAGES, 8)


def test_unknown_stage():
    with pytest.raises(ValueError, match=r"unknown stage\(s\) \['replay'\]"):
        config_lib.parse_stages("reference,replay")


def test_validation_runs_before_any_compute(tmp_path):
    with pytest.raises(ValueError, match="alpha"):
        main.run_stages(tiny_config(**{"sftmix.alpha": -1.0}), str(tmp_path))
    assert not os.path.exists(tmp_path / "reference")


def test_reference_checkpoints_gone(tmp_path):
    """A reference stage marked done whose replay checkpoints were deleted: a clear error."""
    (tmp_path / "reference").mkdir()
    (tmp_path / "reference" / "done.json").write_text(json.dumps({"replay_steps": [8, 16, 24]}))
    (tmp_path / "reference" / "checkpoints").mkdir()
    config = tiny_config(stages="confidence")
    with pytest.raises(FileNotFoundError, match=r"reference checkpoint 8 is gone .* rerun the reference stage"):
        main.run_stages(config, str(tmp_path))


def test_max_length_shorter_than_the_prompt_template():
    from sftmix_jax.data import sources, synthetic

    c = tiny_config(**{"data.max_length": 6})
    with pytest.raises(ValueError, match=r"config.data.max_length=6 is too short: the 'chat' template alone takes \d+ tokens"):
        sources.load_examples(c.data, synthetic.make_tokenizer(), 0)
    c = tiny_config(**{"data.max_length": 40, "data.template": "alpaca"})
    with pytest.raises(ValueError, match=r"max_length=40 is too short: the 'alpaca' template"):
        sources.load_examples(c.data, synthetic.make_tokenizer(), 0)


def test_workdir_accepts_changed_evaluate_keys_and_records_them(tmp_path):
    import json


    base = {"train": {"lr": 1.0, "wandb_project": ""}, "evaluate": {"batch_size": 8}, "stages": "reference"}
    config_lib.check_workdir_config(str(tmp_path), base)
    changed = {"train": {"lr": 1.0, "wandb_project": "p"}, "evaluate": {"batch_size": 16}, "stages": "evaluate"}
    config_lib.check_workdir_config(str(tmp_path), changed)
    assert json.loads((tmp_path / "config.json").read_text()) == changed
    with pytest.raises(SystemExit, match="differing keys: train.lr"):
        config_lib.check_workdir_config(str(tmp_path), {**changed, "train": {"lr": 2.0, "wandb_project": "p"}})


def test_a_workdir_from_before_a_new_key_resumes_if_the_key_is_at_its_default(tmp_path):
    from sftmix_jax import config as config_lib

    c = json.loads(config_lib.defaults().to_json_best_effort())
    old = json.loads(json.dumps(c))
    del old["export"], old["reference"]["tokenizer"]  # keys the code did not have when the run started
    (tmp_path / "config.json").write_text(json.dumps(old))
    config_lib.check_workdir_config(str(tmp_path), c)  # resumes, and records the new keys
    assert json.loads((tmp_path / "config.json").read_text()) == c
    (tmp_path / "config.json").write_text(json.dumps(old))
    c["export"]["dtype"] = "bfloat16"  # a new key away from its default: a different run
    with pytest.raises(SystemExit, match=r"differing keys: export"):
        config_lib.check_workdir_config(str(tmp_path), c)
