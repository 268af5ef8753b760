"""generate.backend=vllm without a GPU: the missing extra is one message at validation and in
the stage; requests follow vLLM's offline multi-modal API (checked against a recording fake
``vllm`` module); a LoRA policy reaches vLLM as one merged full-model directory."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
from typing import ClassVar

import pytest
import torch

from models.vllm_sampling import NEEDS_GPU_EXTRA, VLLMPolicy, VLLMUnavailable

LORA = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0,
        "target_modules": r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"}
no_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")


@no_vllm
def test_missing_vllm_fails_validation_with_one_message():
    from hydra import compose, initialize_config_module

    from flows.schema import ConfigError, register, validate

    register()
    with initialize_config_module("conf", version_base="1.3"):
        cfg = compose("config", overrides=["generate.backend=vllm"])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert str(err.value) == NEEDS_GPU_EXTRA


@no_vllm
def test_missing_vllm_stops_the_stage_before_it_writes(tmp_path):
    from tasks.generate import generate

    cfg = {"generate": {"backend": "vllm", "shards": 1}, "fault": {}}
    with pytest.raises(VLLMUnavailable, match=r"needs the gpu extra: pip install -e '\.\[gpu\]' on a CUDA machine"):
        generate.fn(str(tmp_path), 1, cfg, None)
    assert not any(tmp_path.rglob("*"))


class FakeLLM:
    """Records the engine arguments and requests; answers "a<i>" for sample i of a request."""

    instances: ClassVar[list] = []

    def __init__(self, **kwargs):
        self.kwargs, self.calls = kwargs, []
        FakeLLM.instances.append(self)

    def generate(self, requests, params, use_tqdm=True):
        self.calls.append((requests, params))
        return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=f" a{i} ") for i in range(p.n)])
                for p in params]


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    module.LLM, module.SamplingParams = FakeLLM, FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    FakeLLM.instances.clear()
    return module


def test_requests_follow_the_offline_multimodal_api(fake_vllm, tiny_model_dir):
    from PIL import Image

    from models.records import user_prompt
    from models.sampling import banned_token_ids, prompt_texts

    policy = VLLMPolicy(str(tiny_model_dir), max_images_per_prompt=2)
    image = Image.new("RGB", (32, 32))
    prompts = [user_prompt("what colour?"), user_prompt("and here?", n_images=2), user_prompt("no image", n_images=0)]
    images = [[image], [image, image], []]
    out = policy.generate(prompts, images, max_new_tokens=5, temperature=0.7, top_p=0.9, num_samples=3, seed=4)

    assert out == [["a0", "a1", "a2"]] * 3
    (llm,) = FakeLLM.instances
    assert llm.kwargs["model"] == str(tiny_model_dir) and llm.kwargs["limit_mm_per_prompt"] == {"image": 2}
    requests, params = llm.calls[0]
    texts = prompt_texts(policy.processor, prompts)  # the model's own chat template
    assert requests == [{"prompt": texts[0], "multi_modal_data": {"image": [image]}},
                        {"prompt": texts[1], "multi_modal_data": {"image": [image, image]}},
                        {"prompt": texts[2]}]
    assert all((p.n, p.temperature, p.top_p, p.max_tokens) == (3, 0.7, 0.9, 5) for p in params)
    assert len({p.seed for p in params}) == 3  # each prompt its own stream
    again = policy.generate(prompts, images, max_new_tokens=5, temperature=0.7, top_p=0.9, num_samples=3, seed=4)
    assert again == out and [p.seed for p in llm.calls[1][1]] == [p.seed for p in params]
    assert set(params[0].logit_bias) == set(banned_token_ids(policy.processor))

    # Greedy: one answer asked for, repeated, as HF's greedy num_return_sequences gives.
    greedy = policy.generate(prompts[:1], images[:1], max_new_tokens=5, num_samples=2)
    assert greedy == [["a0", "a0"]] and llm.calls[2][1][0].n == 1 and llm.calls[2][1][0].seed is None

    with pytest.raises(ValueError, match="pixel-tensor transform"):
        policy.generate(prompts[:1], images[:1], max_new_tokens=5, pixel_transform=lambda x: x)
    with pytest.raises(ValueError, match="generate.backend=hf"):
        _ = policy.model


def test_lora_policy_reaches_vllm_as_a_merged_full_model(tiny_model_dir, tmp_path):
    from models.load import load_policy, read_policy, save_policy
    from tasks.common import forget_policy
    from tasks.generate import merged_policy, vllm_model_dir

    model_cfg = {"name_or_path": str(tiny_model_dir), "dtype": "float32", "device": "cpu", "lora": LORA,
                 "gen_batch_size": 4}
    cfg = {"model": model_cfg}
    run_dir = str(tmp_path / "run")
    # Round 1 starts from the base: full weights, handed to vLLM as they are, nothing written.
    assert merged_policy(run_dir, 1, cfg, None) is None
    assert vllm_model_dir(run_dir, 1, cfg, None) == str(tiny_model_dir)

    # Round 2 starts from an adapter chain (a non-zero LoRA delta on the base).
    model, processor = load_policy(model_cfg, None, trainable=True)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.01)
    ckpt = tmp_path / "round_1_checkpoint"
    save_policy(model, processor, ckpt, read_policy(None, model_cfg))
    try:
        merged_policy(run_dir, 2, cfg, str(ckpt))
        path = vllm_model_dir(run_dir, 2, cfg, str(ckpt))
    finally:
        forget_policy()
    assert path == str((tmp_path / "run" / "round_2" / "policy_merged").resolve())
    merged, _ = load_policy({**model_cfg, "name_or_path": path, "lora": {"enabled": False}}, None)
    expected, _ = load_policy(model_cfg, str(ckpt))
    base, _ = load_policy({**model_cfg, "lora": {"enabled": False}}, None)
    got, want, orig = merged.state_dict(), expected.state_dict(), base.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert any(not torch.equal(got[k], orig[k]) for k in orig)  # the adapter really is in the weights
