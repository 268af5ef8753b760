"""PrefLoop's pair log-probs against TRL 1.16's DPOTrainer on the same tiny VLM and pairs.

How TRL 1.16 handles a conversational vision pair (``trl/trainer/dpo_trainer.py``):
- Vision datasets skip the dataset map; ``DataCollatorForVisionPreference`` works per batch:
  ``apply_chat_template`` renders ``prompt`` with the generation prompt and ``prompt + chosen``
  / ``prompt + rejected`` without it; the completion text is the rendering minus the common
  prefix. The prompt is processed with the images (left padded), each completion as plain
  text (``add_special_tokens=False``), then [chosen; rejected] rows are concatenated, 2B
  sequences, and flushed left.
- Per-sequence log-probs: one forward of all 2B rows through a patched "fused LM head"
  (``add_fused_lm_head``) that scores every position whose shifted label is not -100 (labels =
  input_ids outside the completion mask set to -100), summed per row
  (``compute_ref_log_probs``; ``_compute_loss`` does the same for the policy).
- No EOS is added for conversational data: the chat template decides what ends a turn.

The difference, and how the inputs are aligned: PrefLoop's tiny chat template renders an
assistant turn as ``"ASSISTANT: " + text + " "`` and has no end-of-turn token, so TRL's
completion for ``"blue"`` is the text ``" blue "``, tokenised as ``[▁blue, ▁]`` (a trailing
Metaspace token, no EOS), while PrefLoop scores what the policy emits, ``[▁blue, </s>]``
(``completion_ids``). ``test_trl_default_template_differs`` pins this. For the comparison TRL
gets a copy of the processor whose template renders the assistant turn as ``text + eos``
right after ``"ASSISTANT:"``; prompt rendering is unchanged, so both sides then score the very
same token sequences (asserted), and chosen/rejected log-probs and the DPO loss must agree to
1e-4. The policy is the session's tiny model with its LM head perturbed, the reference the
unperturbed model, so the DPO loss is not trivially log 2.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from evaluation.suites.shapes import make_queries, spec_from_config
from models.load import load_processor
from models.losses import DPOLoss
from models.records import assistant_message, user_prompt
from models.tiny import aligned_chat_template
from models.trainer import encode_pairs, pair_logps

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl import DPOConfig, DPOTrainer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

ATOL = 1e-4
BETA = 0.1
REJECTED = ["no", "the red big circle is on the left", "three", "left right", "purple square"]


def make_rows(n: int = 6) -> list[dict]:
    queries = make_queries("train", n, 1, spec_from_config({"image_size": 64}))
    rows = []
    for i, q in enumerate(queries):
        question = q["question"] + (" Answer the question using a single word or phrase." if i % 2 else "")
        rows.append({
            "prompt": user_prompt(question),
            "images": [q["image"]],
            "chosen": assistant_message(q["answer"]),
            "rejected": assistant_message(REJECTED[i % len(REJECTED)]),
        })
    return rows


def load_model(path, perturb: bool):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    if perturb:
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            head = model.get_output_embeddings().weight
            head.add_(0.05 * torch.randn(head.shape, generator=gen))
    return model


def trl_trainer(policy, reference, processor, rows, tmp_path):
    from datasets import Dataset

    args = DPOConfig(
        output_dir=str(tmp_path / "trl"), beta=BETA, bf16=False, use_cpu=True, gradient_checkpointing=False,
        per_device_train_batch_size=len(rows), max_length=None, report_to=[], save_strategy="no",
    )
    return DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=processor)


def test_trl_default_template_differs(tiny_model_dir, tmp_path):
    """With PrefLoop's template unchanged TRL scores ``[text tokens, ▁]`` and no EOS."""
    processor = load_processor(str(tiny_model_dir))
    rows = make_rows(2)
    model = load_model(tiny_model_dir, perturb=False)
    trainer = trl_trainer(model, copy.deepcopy(model), processor, rows, tmp_path)
    batch = trainer.data_collator(copy.deepcopy(rows))
    tok = processor.tokenizer
    chosen = batch["input_ids"][0][batch["completion_mask"][0].bool()].tolist()
    expected_text = tok(rows[0]["chosen"][0]["content"][0]["text"], add_special_tokens=False)["input_ids"]
    assert chosen == expected_text + [tok.convert_tokens_to_ids("▁")]
    assert tok.eos_token_id not in chosen


def test_trl_logps_match_prefloop(tiny_model_dir, tmp_path):
    processor = load_processor(str(tiny_model_dir))
    tok = processor.tokenizer
    rows = make_rows()

    # PrefLoop: shared-prefix engine, policy and reference.
    policy, reference = load_model(tiny_model_dir, perturb=True), load_model(tiny_model_dir, perturb=False)
    encoded, _, dropped = encode_pairs(processor, rows, max_length=512)
    assert dropped == 0
    with torch.no_grad():
        ours = pair_logps(policy, encoded, tok.pad_token_id)
        ours_ref = pair_logps(reference, encoded, tok.pad_token_id)
    our_loss = DPOLoss(beta=BETA)(ours, ours_ref)[0].mean()

    # TRL: its collator and its fused-LM-head log-probs, on separate model instances.
    trl_processor = copy.deepcopy(processor)
    trl_processor.chat_template = aligned_chat_template(tok.eos_token)
    for row in rows:  # prompts render identically under both templates
        assert trl_processor.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False) == \
            processor.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
    trainer = trl_trainer(load_model(tiny_model_dir, perturb=True), load_model(tiny_model_dir, perturb=False),
                          trl_processor, rows, tmp_path)
    batch = trainer.data_collator(copy.deepcopy(rows))

    # Same token sequences: prompt (image tokens expanded) + completion + EOS, completion mask.
    B = len(rows)
    for i in range(2 * B):
        pair, completion = encoded[i % B], (encoded[i % B].chosen if i < B else encoded[i % B].rejected)
        real = batch["attention_mask"][i].bool()
        assert batch["input_ids"][i][real].tolist() == pair.prompt.ids + completion
        assert batch["input_ids"][i][batch["completion_mask"][i].bool()].tolist() == completion
    torch.testing.assert_close(batch["pixel_values"][:B], torch.cat([e.prompt.vision["pixel_values"] for e in encoded]))

    with torch.no_grad():
        trl_chosen, trl_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
        trl_ref_chosen, trl_ref_rejected = trainer.compute_ref_log_probs(trainer.ref_model, batch)
        trl_loss = trainer.compute_loss(trainer.model, batch)
    torch.testing.assert_close(trl_chosen, ours.chosen, atol=ATOL, rtol=0)
    torch.testing.assert_close(trl_rejected, ours.rejected, atol=ATOL, rtol=0)
    torch.testing.assert_close(trl_ref_chosen, ours_ref.chosen, atol=ATOL, rtol=0)
    torch.testing.assert_close(trl_ref_rejected, ours_ref.rejected, atol=ATOL, rtol=0)
    assert (ours.chosen - ours_ref.chosen).abs().max() > 1e-2, "policy must differ from reference"
    assert trl_loss.item() == pytest.approx(our_loss.item(), abs=ATOL)
