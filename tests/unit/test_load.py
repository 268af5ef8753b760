"""Model loading: offline failures are one clear message; LoRA and full policies round-trip."""

import json

import pytest
import torch

from evaluation.suites.shapes import make_queries
from models.load import ModelUnavailable, check_available, load_policy, read_policy, save_policy
from models.logprobs import collate, completion_ids, encode_prompt, sequence_logps
from models.losses import DPOLoss
from models.records import assistant_message, user_prompt
from models.trainer import encode_pairs, reference_logps, train_pairs

TRAIN = dict(lr=5e-3, weight_decay=0.0, epochs=1, max_steps=3, batch_size=4, grad_accum=2, warmup_ratio=0.0,
             max_grad_norm=1.0, max_length=512, ref_batch_size=8)
LORA = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0,
        "target_modules": r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"}


def test_missing_model_offline_is_one_clear_message(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelUnavailable, match="not in the local Hugging Face cache.*model.name_or_path="):
        check_available({"name_or_path": "llava-hf/llava-1.5-7b-hf"})


def test_unreachable_hub_fails_fast(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://127.0.0.1:9")  # nothing listens on port 9
    monkeypatch.setattr("socket.create_connection", _refuse)
    with pytest.raises(ModelUnavailable, match="cannot be reached.*llava-1.5-7b-hf"):
        check_available({"name_or_path": "llava-hf/llava-1.5-7b-hf"})


def _refuse(*args, **kwargs):
    raise ConnectionRefusedError("connection refused")


def test_local_dir_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelUnavailable, match="without config.json"):
        check_available({"name_or_path": str(tmp_path)})


def _pairs(n: int):
    queries = make_queries("train", n, seed=5)
    return [{"prompt": user_prompt(q["question"]), "images": [q["image"]], "chosen": assistant_message(q["answer"]),
             "rejected": assistant_message("no" if q["answer"] != "no" else "yes"),
             "score_chosen": 1.0, "score_rejected": 0.0} for q in queries]


def _with_reference(model, processor, pairs):
    encoded, kept, _ = encode_pairs(processor, pairs, 512)
    chosen, rejected = reference_logps(model, processor, encoded, 8)
    return [pairs[i] | {"ref_chosen_logp": c, "ref_rejected_logp": r} for i, c, r in zip(kept, chosen, rejected)]


def _logp_of(model, processor, pair):
    prompt = encode_prompt(processor, pair["prompt"], pair["images"])
    batch = collate([prompt], [completion_ids(processor.tokenizer, "red")], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        return sequence_logps(model, batch)[0].item()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_trained_policy_saves_and_reloads_over_two_rounds(tiny_model_dir, tmp_path, lora):
    cfg = {"name_or_path": str(tiny_model_dir), "dtype": "float32", "device": "cpu",
           "lora": LORA if lora else {"enabled": False}}
    pairs = _pairs(12)
    checkpoint = None
    for round_index in (1, 2):
        frozen, processor = load_policy(cfg, checkpoint, trainable=False)
        before = _logp_of(frozen, processor, pairs[0])
        model, processor = load_policy(cfg, checkpoint, trainable=True)
        assert hasattr(model, "peft_config") == lora
        history = train_pairs(model, processor, _with_reference(frozen, processor, pairs), DPOLoss(0.1), TRAIN, seed=0)
        assert len(history) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
        trained = _logp_of(model, processor, pairs[0])
        out = tmp_path / f"round_{round_index}"
        save_policy(model, processor, out, read_policy(checkpoint, cfg))
        reloaded, _ = load_policy(cfg, str(out), trainable=False)
        after = _logp_of(reloaded, processor, pairs[0])
        assert after != pytest.approx(before, abs=1e-6)  # parameters changed
        assert after == pytest.approx(trained, abs=1e-4)  # and what was trained is what reloads
        saved = json.loads((out / "policy.json").read_text())
        if lora:
            assert saved["kind"] == "adapter" and len(saved["adapters"]) == round_index
            assert (out / "adapter_model.safetensors").exists()
        else:
            assert saved["kind"] == "full" and (out / "model.safetensors").exists()
        checkpoint = str(out)
