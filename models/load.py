"""Load any Hugging Face image-text-to-text model, and the policies PrefLoop trains from it.

A *policy* is described by the ``policy.json`` that the train stage writes next to a
checkpoint:

    {"kind": "full", "path": "<dir with config + weights + processor>"}
    {"kind": "adapter", "base": "<hub id or dir>", "adapters": ["<round 1 adapter>", ...]}

Adapters are merged in order into the base weights, so round i's policy is
base + delta_1 + ... + delta_{i-1}, and round i trains a fresh adapter on top: the
reference of round i is exactly the round's starting policy (UV-CoT Algorithm 2).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch


class ModelUnavailable(RuntimeError):
    """Raised with a one-paragraph, user-facing message; the CLI prints it without a traceback."""


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype={dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def base_model_path(model_cfg: dict) -> str:
    """Hub id or local directory of the base weights; builds the embedded tiny model if asked."""
    if model_cfg.get("tiny"):
        from models.tiny import TinySpec, ensure_tiny

        return str(ensure_tiny(TinySpec.from_config(model_cfg["tiny"]), Path(model_cfg["cache_dir"])))
    return model_cfg["name_or_path"]


def check_available(model_cfg: dict, probe_timeout_s: float = 3.0) -> None:
    """Fail fast, before any stage runs, when the weights can be found neither on disk nor
    on a reachable hub. Costs a cache lookup and at most one TCP connect."""
    if model_cfg.get("tiny"):
        return
    name = model_cfg["name_or_path"]
    if Path(name).is_dir():
        if not (Path(name) / "config.json").exists():
            raise ModelUnavailable(f"model.name_or_path={name!r} is a directory without config.json; "
                                   "point it at a folder written by save_pretrained().")
        return
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return
    how = (f"Download it where the hub is reachable (`hf download {name} --local-dir /path/to/{name.split('/')[-1]}`), "
           f"copy it here, and run with model.name_or_path=/path/to/{name.split('/')[-1]}; "
           "or use the embedded default with model=tiny.")
    if constants.HF_HUB_OFFLINE:
        raise ModelUnavailable(f"Model {name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set. {how}")
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=probe_timeout_s).close()
    except OSError as err:
        raise ModelUnavailable(
            f"Model {name!r} is not available offline and the hub ({host}) cannot be reached: {err}. {how}"
        ) from None


def load_processor(path: str):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path)


def _load_base(path: str, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForImageTextToText

    try:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
    except OSError as err:
        raise ModelUnavailable(f"Could not load model weights from {path!r}: {err}") from None
    return model.to(device)


def read_policy(checkpoint_dir: str | None, model_cfg: dict) -> dict:
    """The policy description of a checkpoint, or the base model's when there is none."""
    if checkpoint_dir is None:
        return {"kind": "full", "path": base_model_path(model_cfg)}
    return json.loads((Path(checkpoint_dir) / "policy.json").read_text())


def load_policy(model_cfg: dict, checkpoint_dir: str | None = None, trainable: bool = False):
    """(model, processor) for the policy saved in ``checkpoint_dir`` (None: the base model).

    With ``trainable`` and ``model.lora.enabled``, a fresh LoRA adapter is attached on top of
    the merged policy; otherwise all weights stay trainable (full fine-tuning).
    """
    device = resolve_device(model_cfg.get("device", "auto"))
    dtype = resolve_dtype(model_cfg.get("dtype", "auto"), device)
    policy = read_policy(checkpoint_dir, model_cfg)
    if policy["kind"] == "full":
        model = _load_base(policy["path"], dtype, device)
        processor = load_processor(policy["path"])
    else:
        from peft import PeftModel

        model = _load_base(policy["base"], dtype, device)
        processor = load_processor(policy["base"])
        for adapter in policy["adapters"]:
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    if trainable and model_cfg.get("lora", {}).get("enabled"):
        model = attach_lora(model, model_cfg["lora"])
    model.train(trainable)
    if not trainable:
        model.requires_grad_(False)
    return model, processor


def attach_lora(model, lora_cfg: dict):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora_cfg["r"],
        lora_alpha=lora_cfg["alpha"],
        lora_dropout=lora_cfg["dropout"],
        target_modules=lora_cfg["target_modules"],
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def save_policy(model, processor, out_dir: Path, parent_policy: dict, final_dir: Path | None = None) -> dict:
    """Save the trained policy as safetensors and write the policy.json that loads it.

    ``out_dir`` is where files are written (a stage's temporary directory); ``final_dir`` is
    where they will live after the atomic rename, and is what policy.json records."""
    out_dir.mkdir(parents=True, exist_ok=True)
    final = (final_dir or out_dir).resolve()
    if hasattr(model, "peft_config"):
        model.save_pretrained(out_dir, safe_serialization=True)  # adapter only
        if parent_policy["kind"] == "full":
            policy = {"kind": "adapter", "base": parent_policy["path"], "adapters": []}
        else:
            policy = {"kind": "adapter", "base": parent_policy["base"], "adapters": list(parent_policy["adapters"])}
        policy["adapters"].append(str(final))
    else:
        model.save_pretrained(out_dir, safe_serialization=True)
        processor.save_pretrained(out_dir)
        policy = {"kind": "full", "path": str(final)}
    (out_dir / "policy.json").write_text(json.dumps(policy, indent=2))
    return policy


def set_threads() -> None:
    """Use every core for intra-op work on CPU; respects an explicit OMP_NUM_THREADS."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)
