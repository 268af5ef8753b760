"""train.launcher options validate with clear messages, the accelerate configs in conf/accelerate
say what they claim, and a rank's share of each batch is its slice of the global one."""

from types import SimpleNamespace

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from hydra import compose, initialize_config_module

from flows.schema import ConfigError, register, validate
from models.data_parallel import DataParallel
from models.distributed_train import ACCELERATE_CONFIGS, accelerate_config_path


@pytest.fixture(scope="module", autouse=True)
def hydra_ctx():
    register()
    with initialize_config_module("conf", version_base="1.3"):
        yield


def test_default_trains_in_process():
    cfg = compose("config")
    assert cfg.train.launcher == "inprocess" and cfg.train.accelerate_config == "ddp_cpu"
    validate(cfg)


@pytest.mark.parametrize("overrides,message", [
    (["train.launcher=bogus"], r"train.launcher='bogus' is not one of inprocess, accelerate"),
    (["train.launcher=accelerate", "train.accelerate_config=zero4"],
     r"train.accelerate_config='zero4': no file .*zero4.yaml; use one of ddp_cpu, zero2, zero3"),
    (["train.launcher=accelerate", "train.num_processes=0"], r"train.num_processes=0 must be at least 1"),
])
def test_bad_launcher_options_fail_validation_clearly(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose("config", overrides=overrides))


@pytest.mark.parametrize("name", ["zero2", "zero3", "ddp_cpu"])
def test_accelerate_launch_options_validate(name):
    validate(compose("config", overrides=["train.launcher=accelerate", f"train.accelerate_config={name}"]))


def test_a_config_file_path_is_accepted(tmp_path):
    own = tmp_path / "cluster.yaml"
    own.write_text("distributed_type: MULTI_GPU\n")
    assert accelerate_config_path(str(own)) == own


@pytest.mark.parametrize("name,stage", [("zero2", 2), ("zero3", 3)])
def test_zero_configs_are_deepspeed_bf16_at_their_stage(name, stage):
    config = load_config_from_file(str(ACCELERATE_CONFIGS / f"{name}.yaml"))  # as accelerate launch reads it
    assert config.distributed_type == "DEEPSPEED"
    assert config.deepspeed_config["zero_stage"] == stage
    assert config.mixed_precision == "bf16" and not config.use_cpu


def test_ddp_cpu_config_runs_ranks_on_cpu_without_mixed_precision():
    config = load_config_from_file(str(ACCELERATE_CONFIGS / "ddp_cpu.yaml"))
    assert config.use_cpu and config.mixed_precision == "no"
    assert config.distributed_type == "MULTI_GPU"  # accelerate's torchrun launcher for local processes


@pytest.mark.parametrize("batch,world", [(8, 2), (7, 2), (5, 3), (2, 2)])
def test_rank_shares_partition_the_batch_in_order(batch, world):
    ranks = [DataParallel(SimpleNamespace(process_index=r, num_processes=world, distributed_type="MULTI_CPU"))
             for r in range(world)]
    shares = [rank.share(list(range(batch))) for rank in ranks]
    assert [i for share in shares for i in share] == list(range(batch))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert ranks[0].is_main and not any(rank.is_main for rank in ranks[1:])
