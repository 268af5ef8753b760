"""The embedded default model: a tiny LLaVA built and SFT-trained locally, then loaded from
disk through ``models.load`` exactly like a hub model.

Architecture (LLaVA-1.5 shape, shrunk): CLIP vision tower -> 2-layer GELU projector ->
Llama decoder. A BPE tokenizer (sentencepiece-style Metaspace, like LLaMA's) is trained with
``tokenizers`` on the synthetic suite's text plus the prompts PrefLoop's methods use, over the
printable ASCII alphabet so any English text encodes without unknown tokens.

The base is SFT-trained on the suite's ``sft`` split (disjoint from the ``train`` pool the
preference rounds draw from and from ``test``) for a fixed small number of steps, so it lands
at a moderate held-out accuracy that rounds can move. The result is cached under
``<cache_dir>/tiny-<hash of the spec>/`` and reused by every later run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import string
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from evaluation.suites.shapes import (
    ShapesSpec,
    answer_space,
    corpus,
    make_queries,
    skewed_queries,
    spec_from_config,
    unanswerable_queries,
    UNANSWERABLE,
)
from models.logprobs import collate, completion_ids, encode_prompt, sequence_logps
from models.progress import Progress
from models.records import Query, user_prompt
from models.tiny_formats import PLAIN, format_item, item_kinds

log = logging.getLogger("prefloop")

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]

# Our own LLaVA-1.5-style template: images first, then text, "ASSISTANT:" as the generation prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- message['role'].upper() + ': ' -}}"
    "{%- for item in message['content'] if item['type'] == 'image' -%}{{- '<image>\n' -}}{%- endfor -%}"
    "{%- for item in message['content'] if item['type'] == 'text' -%}{{- item['text'] + ' ' -}}{%- endfor -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

def aligned_chat_template(eos_token: str) -> str:
    """PrefLoop's tiny template for prompts; an assistant turn renders as ``text + eos`` right
    after ``"ASSISTANT:"``, so TRL's completion tokens equal PrefLoop's ``completion_ids``
    (tests/unit/test_trl_logps_parity.py asserts the token sequences are identical)."""
    return (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'assistant' -%}"
        "{{- 'ASSISTANT:' -}}"
        "{%- for item in message['content'] if item['type'] == 'text' -%}{{- item['text'] -}}{%- endfor -%}"
        f"{{{{- '{eos_token}' -}}}}"
        "{%- else -%}"
        "{{- message['role'].upper() + ': ' -}}"
        "{%- for item in message['content'] if item['type'] == 'image' -%}{{- '<image>\\n' -}}{%- endfor -%}"
        "{%- for item in message['content'] if item['type'] == 'text' -%}{{- item['text'] + ' ' -}}{%- endfor -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
    )


# Prompts other methods add to questions; in the tokenizer corpus so they tokenize compactly.
METHOD_TEXT = [
    "USER: ASSISTANT:",
    "Please provide the bounding box coordinate of the region that can help you answer the question better.",
    "Please answer the question based on the original image and local detail image.",
    "Answer the question using a single word or phrase.",
    "Think step by step. Final answer:",
    "### Answer:",
    "Is the answer right? Please answer yes or no.",
    "[0.25, 0.25, 0.75, 0.75] 0 1 2 3 4 5 6 7 8 9 10",
]


# TinySpec fields added after bases were cached, with their off values (see TinySpec.key).
LATER_OPTIONS = {"sft_box_share": 0.0, "sft_cot_share": 0.0, "sft_skew_steps": 0, "sft_unanswerable_share": 0.0}


@dataclass
class TinySpec:
    """Everything that determines the built model; its hash names the cache directory."""

    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    vocab_size: int = 384
    sft_steps: int = 800
    sft_batch_size: int = 32
    sft_lr: float = 1e-3
    sft_queries: int = 6000
    # > 0: the SFT split over-represents one answer per question type by this share (e.g. 0.6:
    # "red" is 60 % of colour answers instead of 25 %), so the base has a skewed answer prior;
    # it is evaluated on the balanced test split (evaluation/suites/shapes.skewed_queries).
    sft_favoured_share: float = 0.0
    # > 0 (with sft_favoured_share): only the last sft_skew_steps SFT steps draw from the skewed
    # answers, the earlier ones from balanced answers. The base then perceives what a balanced
    # base perceives and carries the skewed prior on top of it, as a VLM instruction-tuned last
    # on a yes-heavy mix does; trained on skewed answers throughout, it learns less (README).
    sft_skew_steps: int = 0
    # > 0: shares of the SFT queries taught as UV-CoT box chains / MPO CoT answers instead of
    # plain answers, the formats a hub VLM's SFT mix teaches (models/tiny_formats.py)
    sft_box_share: float = 0.0
    sft_cot_share: float = 0.0
    # > 0: this share of the SFT items asks about an object the image does not hold (colour,
    # shape and position questions), answered "unanswerable", as VizWiz does in LLaVA-1.5's SFT
    # mix; the suite's splits never ask such questions (evaluation/suites/shapes.unanswerable_queries)
    sft_unanswerable_share: float = 0.0
    check_queries: int = 300
    seed: int = 0
    suite: dict = field(default_factory=dict)  # ShapesSpec overrides

    def __post_init__(self) -> None:
        if not 0 <= self.sft_skew_steps <= self.sft_steps:
            raise ValueError(f"model.tiny.sft_skew_steps={self.sft_skew_steps} must be in [0, sft_steps={self.sft_steps}]")
        if not 0 <= self.sft_unanswerable_share < 1:
            raise ValueError(f"model.tiny.sft_unanswerable_share={self.sft_unanswerable_share} must be in [0, 1)")
        if self.sft_skew_steps and not self.sft_favoured_share:
            raise ValueError("model.tiny.sft_skew_steps > 0 needs model.tiny.sft_favoured_share > 0 (the skewed answers)")

    @classmethod
    def from_config(cls, cfg: dict) -> "TinySpec":
        names = {f.name for f in fields(cls)}
        unknown = set(cfg) - names
        if unknown:
            raise ValueError(f"unknown model.tiny keys {sorted(unknown)}; known: {sorted(names)}")
        return cls(**{k: (dict(v) if k == "suite" else v) for k, v in cfg.items()})

    def shapes(self) -> ShapesSpec:
        return spec_from_config(self.suite | {"image_size": self.image_size})

    def key(self) -> str:
        # Options added later hash only when set, so bases built before they existed keep
        # their cache directory (and every run key built on it).
        spec = {k: v for k, v in asdict(self).items() if not (k in LATER_OPTIONS and v == LATER_OPTIONS[k])}
        blob = json.dumps(spec, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_tokenizer(spec: TinySpec):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=list(string.printable.strip() + "▁\n"),
        show_progress=False,
    )
    lines = corpus(spec.shapes()) + METHOD_TEXT + ([UNANSWERABLE] if spec.sft_unanswerable_share else [])
    tok.train_from_iterator(lines * 20, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )


def build_processor(spec: TinySpec, tokenizer):
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    # CLIP prepends a CLS feature; "default" selection drops it, so tokens per image =
    # (image/patch)^2 + 1 - 1.
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_model(spec: TinySpec, tokenizer):
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=4 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
    )
    text = LlamaConfig(
        hidden_size=spec.text_hidden,
        intermediate_size=4 * spec.text_hidden,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )
    torch.manual_seed(spec.seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def sft_phases(spec: TinySpec) -> list[tuple[int, list[Query]]]:
    """(first SFT step, the queries it draws from) for each phase of the base's SFT: balanced
    answers, skewed answers (``sft_favoured_share``), or balanced then skewed for the last
    ``sft_skew_steps`` steps."""
    def balanced():
        return make_queries("sft", spec.sft_queries, spec.seed, spec.shapes())

    def skewed():
        return skewed_queries("sft", spec.sft_queries, spec.seed, spec.shapes(), spec.sft_favoured_share)

    if spec.sft_favoured_share == 0:
        phases = [(0, balanced())]
    elif spec.sft_skew_steps in (0, spec.sft_steps):
        phases = [(0, skewed())]
    else:
        phases = [(0, balanced()), (spec.sft_steps - spec.sft_skew_steps, skewed())]
    return [(first, _with_unanswerable(queries, spec)) for first, queries in phases]


def _with_unanswerable(queries: list[Query], spec: TinySpec) -> list[Query]:
    """``queries`` with a share ``sft_unanswerable_share`` of them (at seeded random positions)
    replaced by questions about absent objects; unchanged when the share is 0."""
    n = round(len(queries) * spec.sft_unanswerable_share)
    if n == 0:
        return queries
    mixed = list(queries)
    positions = random.Random(f"sft-unanswerable/{spec.seed}").sample(range(len(mixed)), n)
    for position, query in zip(positions, unanswerable_queries("sft", n, spec.seed, spec.shapes())):
        mixed[position] = query
    return mixed


def sft(model, processor, spec: TinySpec) -> dict:
    """Next-token SFT on ground-truth targets (plain answers, plus the format items of
    models/tiny_formats.py when their shares are set): AdamW, linear warm-up, cosine decay."""
    phases = sft_phases(spec)
    encoded = [_encode_sft_items(processor, queries, spec) for _, queries in phases]
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.sft_lr, weight_decay=0.0)
    warmup = max(1, spec.sft_steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, spec.sft_steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    rng = random.Random(spec.seed)
    order: list[int] = []
    model.train()
    progress = Progress("tiny sft", spec.sft_steps, unit="steps")
    losses = []
    for step in range(spec.sft_steps):
        phase = max(i for i, (first, _) in enumerate(phases) if step >= first)
        if step == phases[phase][0] and phase > 0:
            order = []  # a new phase starts a fresh pass over its own queries
        prompts, answers = encoded[phase]
        if len(order) < spec.sft_batch_size:
            order += rng.sample(range(len(prompts)), len(prompts))
        idx, order = order[: spec.sft_batch_size], order[spec.sft_batch_size :]
        batch = collate([prompts[i] for i in idx], [answers[i] for i in idx], processor.tokenizer.pad_token_id)
        logp, n = sequence_logps(model, batch)
        loss = -(logp.sum() / n.sum())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        progress.update(1, loss=loss.item())
    model.eval()
    return {"sft_final_loss": sum(losses[-20:]) / len(losses[-20:])}


def _encode_sft_items(processor, queries, spec: TinySpec) -> tuple[list, list]:
    """Prompt and target ids of the SFT items built from ``queries`` (plain answers, plus the
    box-chain and CoT formats at their shares)."""
    kinds = item_kinds(len(queries), spec.sft_box_share, spec.sft_cot_share, spec.seed)
    kinds = [PLAIN if q["answer"] == UNANSWERABLE else kind for q, kind in zip(queries, kinds)]
    items = [format_item(q, kind) for q, kind in zip(queries, kinds)]
    prompts = [encode_prompt(processor, prompt, images) for prompt, images, _ in items]
    answers = [completion_ids(processor.tokenizer, target) for _, _, target in items]
    return prompts, answers


def quick_accuracy(model, processor, spec: TinySpec) -> float:
    from evaluation.metrics import exact_match
    from models.sampling import generate

    queries = make_queries("test", spec.check_queries, spec.seed, spec.shapes())
    responses = generate(
        model, processor, [user_prompt(q["question"]) for q in queries], [[q["image"]] for q in queries],
        max_new_tokens=4, batch_size=64, label="tiny check",
    )
    return sum(exact_match(r[0], q["answer"]) for r, q in zip(responses, queries)) / len(queries)


def ensure_tiny(spec: TinySpec, cache_dir: Path) -> Path:
    """Path of the built tiny model for ``spec``; builds it (1-3 minutes) if not cached."""
    final = cache_dir / f"tiny-{spec.key()}"
    if (final / "manifest.json").exists():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f"tiny-{spec.key()}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("building the embedded tiny LLaVA (spec %s) into %s", spec.key(), final)
    start = time.perf_counter()
    torch.manual_seed(spec.seed)
    tokenizer = build_tokenizer(spec)
    processor = build_processor(spec, tokenizer)
    model = build_model(spec, tokenizer)
    stats = sft(model, processor, spec)
    stats["check_accuracy"] = quick_accuracy(model, processor, spec)
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    manifest = {
        "spec": asdict(spec),
        "parameters": sum(p.numel() for p in model.parameters()),
        "answer_space": sorted(answer_space(spec.shapes())),
        "build_seconds": round(time.perf_counter() - start, 1),
        **stats,
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    try:
        os.rename(tmp, final)
    except OSError:  # another process finished the same build first; theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("tiny model built in %.0fs: %s", manifest["build_seconds"], {k: manifest[k] for k in stats})
    return final
