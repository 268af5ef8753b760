"""Every config group option composes and instantiates; bad overrides fail with a clear message."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from flows.schema import ConfigError, register, validate

CONF = Path(__file__).resolve().parents[2] / "conf"
GROUPS = ["method", "model", "loss", "data", "eval", "judge", "train", "generate"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


@pytest.fixture(scope="module", autouse=True)
def hydra_ctx():
    register()
    with initialize_config_module("conf", version_base="1.3"):
        yield


@pytest.fixture(scope="module")
def local_dataset(tmp_path_factory) -> Path:
    """A small save_to_disk dataset for options that need a user dataset (data=hf, eval=hf)."""
    import datasets

    from evaluation.suites.shapes import load_split

    path = tmp_path_factory.mktemp("hf") / "shapes"
    datasets.DatasetDict({"train": load_split("train", 8, 0), "test": load_split("test", 8, 0)}).save_to_disk(path)
    return path


def _option_overrides(group: str, option: str, local_dataset: Path) -> list[str]:
    extra = [f"{group}.source.path={local_dataset}"] if option == "hf" else []
    return [f"{group}={option}", *extra]


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes(group, option, local_dataset):
    cfg = compose("config", overrides=_option_overrides(group, option, local_dataset))
    node = cfg[group]
    if "_target_" in node:
        component = instantiate(node, _convert_="all")
        assert component is not None
    if group == "data" or group == "eval":
        source = instantiate(node.source, _convert_="all")
        assert len(source.queries(node.split, 0, 3, 0)) == 3


def test_default_selection():
    cfg = compose("config")
    assert cfg.method._target_ == "methods.seva.SeVa"
    assert cfg.model.name_or_path == "tiny" and cfg.model.tiny.patch_size == 8
    # SeVa's default loss is DPO + NLL (conf/method/seva.yaml) over one round
    assert sorted(cfg.loss.components) == ["dpo", "sft"] and cfg.loss.components.dpo.loss.beta == 0.1
    assert cfg.judge._target_.endswith("CorrectnessJudge")
    assert cfg.rounds == 1 and compose("config", overrides=["method=reasoner"]).rounds == 3


def test_real_model_configs_have_real_ids():
    ids = {o: compose("config", overrides=[f"model={o}"]).model.name_or_path for o in ("llava7b", "llava13b", "qwen2vl7b")}
    assert ids == {"llava7b": "llava-hf/llava-1.5-7b-hf", "llava13b": "llava-hf/llava-1.5-13b-hf",
                   "qwen2vl7b": "Qwen/Qwen2-VL-7B-Instruct"}


def test_unknown_option_names_the_alternatives():
    with pytest.raises(MissingConfigException, match="Could not find 'method/sevaa'"):
        compose("config", overrides=["method=sevaa"])


@pytest.mark.parametrize("override", ["rounds=abc", "loss.beta=high", "train.lr=fast"])
def test_wrong_type_fails(override):
    with pytest.raises(ConfigCompositionException):
        compose("config", overrides=[override])


@pytest.mark.parametrize("override", ["method.noise_stp=3", "model.tiny.foo=1", "eval.sise=10"])
def test_misspelt_key_fails(override):
    with pytest.raises(ConfigCompositionException, match="Could not override"):
        compose("config", overrides=[override])


@pytest.mark.parametrize("override,where", [("+method.noise_stp=3", "method"), ("+roundz=2", "top-level"),
                                            ("+loss.bta=1", "loss"), ("+model.lora.rank=4", "top-level")])
def test_force_added_keys_are_caught_by_validate(override, where):
    cfg = compose("config", overrides=[override])
    with pytest.raises(ConfigError, match=where):
        validate(cfg)


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_validates(group, option, local_dataset):
    validate(compose("config", overrides=_option_overrides(group, option, local_dataset)))


EXPERIMENTS = sorted(p.stem for p in (Path(__file__).parents[2] / "conf" / "experiment").glob("*.yaml"))


def test_the_packaged_experiments_are_all_found():
    assert {"methods", "seva_ablation", "uvcot_ablation", "mpo_ablation", "reasoner_ablation",
            "seva_tuning", "seva_recipe", "reasoner_tuning", "reasoner_recipe",
            "uvcot_tuning", "mpo_tuning", "mpo_recipe"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_variant_and_its_control_compose(experiment):
    """Each packaged experiment's variants (and the matched control's overrides) compose and
    pass the schemas, so `python -m flows.iterate experiment=<name>` cannot fail half-way on a typo."""
    from flows.ablate import compose_run, control_overrides

    cfg = compose("config", overrides=[f"experiment={experiment}"])
    ablation = OmegaConf.to_container(cfg.ablation)
    # a table compares at least two rows: two variants, or one variant and its control
    assert cfg.experiment_name == experiment
    assert len(ablation["variants"]) + bool(ablation["control"]) >= 2
    # only the tuning experiment looks at the validation split; every other one reports on test
    assert cfg.eval.split == ("validation" if experiment.endswith("_tuning") else "test")
    assert set(ablation["control_for"] or []) <= set(ablation["variants"])
    for label, overrides in ablation["variants"].items():
        variant = compose_run([f"experiment={experiment}", *overrides, "label=x"])
        if label in (ablation["control_for"] or ablation["variants"]):
            control = compose_run([f"experiment={experiment}",
                                   *control_overrides(overrides, variant, [1] * variant["rounds"])])
            assert control["method"]["_target_"].endswith("ContinuedSFT")
            assert control["loss"]["_target_"].endswith("SFTLoss")
            assert control["train"]["steps_per_round"] == [1] * variant["rounds"]
            # the same queries: experiment=methods' reasoner variant sets no round size, its method does
            assert control["queries_per_round"] == variant["queries_per_round"]
            # the same rounds: method=seva re-defaults them to one
            assert control["rounds"] == variant["rounds"]
            # the same base model: experiment=methods' uvcot variant sets no SFT formats, its method does
            assert control["model"]["tiny"] == variant["model"]["tiny"]
            assert {k: v for k, v in control["train"].items() if k != "steps_per_round"} == \
                {k: v for k, v in variant["train"].items() if k != "steps_per_round"}


@pytest.mark.parametrize("overrides,expected", [(["method=reasoner"], 1000), (["method=seva"], 500),
                                                (["method=mpo"], 2000), (["method=uvcot"], 1000),
                                                (["method=reasoner", "queries_per_round=300"], 300),
                                                (["method=reasoner", "experiment=uvcot_ablation"], 200)])
def test_a_method_can_re_default_the_round_size_and_the_command_line_wins(overrides, expected):
    """conf/method/reasoner.yaml re-defaults queries_per_round to 1000 and conf/method/mpo.yaml
    to 2000 (README: their tuned recipes); seva keeps the schema's 500; an override or
    experiment wins."""
    assert compose("config", overrides=overrides).queries_per_round == expected


@pytest.mark.parametrize("overrides,shares", [(["method=uvcot"], (0.2, 0.1)), (["method=seva"], (0.0, 0.0)),
                                              (["method=uvcot", "tiny_formats.box_share=0.3"], (0.3, 0.1)),
                                              (["method=uvcot", "model.tiny.sft_box_share=0"], (0.0, 0.1))])
def test_a_method_selects_the_formats_its_embedded_base_learns(overrides, shares):
    """conf/method/uvcot.yaml makes the tiny base learn UV-CoT's box chain on part of its SFT
    mix (conf/tiny_formats/uvcot.yaml); other methods keep the plain base; the command line wins."""
    tiny = OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)["model"]["tiny"]
    assert (tiny["sft_box_share"], tiny["sft_cot_share"]) == shares


@pytest.mark.parametrize("overrides,size", [(["method=uvcot"], 1000), (["method=uvcot", "eval.size=400"], 400),
                                            (["method=seva"], 300), (["experiment=uvcot_ablation"], 300)])
def test_uvcot_evaluates_its_chain_on_every_held_out_item(overrides, size):
    """conf/method/uvcot.yaml selects conf/box_cot_size/all.yaml (the chain's gain is reported
    next to greedy accuracy's, on the same items); the eval group's 300 stays for every other
    run, so their run keys do not move; uvcot_ablation pins the 300 its table used."""
    cfg = OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)
    assert cfg["eval"]["box_cot_size"] == size


def test_a_hub_model_ignores_the_tiny_formats():
    cfg = OmegaConf.to_container(compose("config", overrides=["method=uvcot", "model=llava7b"]), resolve=True)
    assert cfg["model"]["tiny"] is None
    assert cfg["tiny_formats"] == {"box_share": 0.2, "cot_share": 0.1, "unanswerable_share": 0.0}


def test_an_experiment_variant_interpolates_its_own_run_settings():
    """uvcot_ablation's larger evaluator is built per seed on the run's suite: the variant's
    ${seed} / ${data.source.suite} must resolve in each run's config, not when the experiment
    is read (flows.iterate.ablation_plan keeps them unresolved)."""
    from flows.ablate import compose_run
    from flows.iterate import ablation_plan

    ablation = ablation_plan(compose("config", overrides=["experiment=uvcot_ablation"]))
    overrides = ablation["variants"]["larger_evaluator"]
    assert any("${seed}" in o for o in overrides)
    for seed in (1, 2):
        run = compose_run(["experiment=uvcot_ablation", *overrides, f"seed={seed}"])
        assert run["judge"]["model"]["tiny"]["seed"] == seed
        assert run["judge"]["model"]["tiny"]["suite"] == run["data"]["source"]["suite"]


def test_a_later_tiny_option_at_its_off_value_leaves_the_run_key_unchanged():
    """Runs measured before model.tiny.sft_skew_steps existed keep their keys (and are reused)."""
    import copy

    from flows.iterate import run_key

    cfg = OmegaConf.to_container(compose("config", overrides=["method=seva"]), resolve=True)
    without = copy.deepcopy(cfg)
    del without["model"]["tiny"]["sft_skew_steps"]
    assert cfg["model"]["tiny"]["sft_skew_steps"] == 0
    assert run_key(cfg) == run_key(without)
    skewed = copy.deepcopy(cfg)
    skewed["model"]["tiny"].update(sft_favoured_share=0.7, sft_skew_steps=300)
    assert run_key(skewed) != run_key(dict(cfg, model=dict(cfg["model"], tiny=dict(cfg["model"]["tiny"], sft_favoured_share=0.7))))


@pytest.mark.parametrize("overrides,expected", [
    (["method=seva"], (1, 3e-5, "dpo_nll", 0.15)),
    (["method=seva", "rounds=3", "train.lr=3e-4", "loss=dpo", "tiny_formats.unanswerable_share=0"], (3, 3e-4, "dpo", 0.0)),
    (["method=reasoner"], (3, 3e-4, "dpo_nll", 0.0)),
    (["method=mpo"], (3, 3e-4, "mpo", 0.0)),
    (["experiment=seva_tuning", "method=seva", "loss=dpo"], (3, 3e-4, "dpo", 0.0)),
])
def test_seva_re_defaults_its_base_rounds_lr_and_loss_and_the_command_line_wins(overrides, expected):
    """conf/method/seva.yaml selects a base with unanswerable SFT questions, one round at lr 3e-5
    and DPO + NLL (README: seva_refusal_seeds_tuning); other methods keep 3 rounds at 3e-4 on a
    plain base; the earlier SeVa probes pin the settings they measured."""
    cfg = OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)
    parts = sorted(cfg["loss"].get("components", {}))
    loss = "dpo" if cfg["loss"]["_target_"].endswith("DPOLoss") else {("dpo", "sft"): "dpo_nll"}.get(tuple(parts), "mpo")
    assert (cfg["rounds"], cfg["train"]["lr"], loss, cfg["model"]["tiny"]["sft_unanswerable_share"]) == expected


def test_an_unknown_optimizer_fails_before_any_stage():
    from flows.schema import ConfigError, validate

    validate(compose("config", overrides=["train.optimizer=sgd"]))
    with pytest.raises(ConfigError, match="train.optimizer='adam' is not one of adamw, sgd"):
        validate(compose("config", overrides=["train.optimizer=adam"]))


@pytest.mark.parametrize("key,off", [(("train", "optimizer"), "adamw"),
                                     (("model", "tiny", "sft_unanswerable_share"), 0.0)])
def test_later_options_at_their_off_values_leave_the_run_key_unchanged(key, off):
    import copy

    from flows.iterate import run_key

    cfg = OmegaConf.to_container(compose("config", overrides=["method=reasoner"]), resolve=True)
    without = copy.deepcopy(cfg)
    node = without
    for part in key[:-1]:
        node = node[part]
    assert node.pop(key[-1]) == off
    assert run_key(cfg) == run_key(without)
