"""The pair log-prob engine on the session's tiny LLaVA (float32, CPU).

Three computations of the same numbers must agree to 1e-5:
- shared prefix (``pair_logps(..., shared_prefix=True)``): image + prompt once per pair, chosen
  and rejected continue from the KV cache;
- concatenated (``shared_prefix=False``): [chosen; rejected] as 2B left-padded sequences;
- unpadded, one sequence at a time, with full logits (no ``logits_to_keep``), summed by hand.
The batch mixes prompt lengths (two question templates, different questions) and response
lengths (1 to 9 tokens), so left padding of prompts and right padding of continuations both
occur. Gradients of both batched paths agree too, including in the vision tower (the prefix).
"""

from __future__ import annotations

import copy

import pytest
import torch

from evaluation.suites.shapes import make_queries, spec_from_config
from models.logprobs import (
    collate,
    collate_shared,
    completion_ids,
    encode_prompt,
    sequence_logps,
    shared_prefix_logps,
)
from models.records import assistant_message, user_prompt
from models.trainer import encode_pairs, pair_logps, reference_logps

ATOL = 1e-5
# 1-6 text tokens + EOS; sums stay within |x| < 32 on the test model, where a float32 ulp is
# <= 2e-6, so 1e-5 is a tolerance of several ulps, not one.
REJECTED = ["no", "the circle is left", "three", "left right left", "red red red red red red", "two"]


def make_pairs(n: int = 6) -> list[dict]:
    queries = make_queries("train", n, 0, spec_from_config({"image_size": 64}))
    pairs = []
    for i, q in enumerate(queries):
        question = q["question"] + (" Answer the question using a single word or phrase." if i % 2 else "")
        pairs.append({
            "prompt": user_prompt(question),
            "images": [q["image"]],
            "chosen": assistant_message(q["answer"]),
            "rejected": assistant_message(REJECTED[i % len(REJECTED)]),
        })
    return pairs


@pytest.fixture(scope="module")
def encoded(tiny_policy):
    _, processor = tiny_policy
    enc, kept, dropped = encode_pairs(processor, make_pairs(), max_length=512)
    assert dropped == 0 and kept == list(range(6))
    assert len({len(e.prompt.ids) for e in enc}) > 1, "prompt lengths must differ"
    assert len({len(e.rejected) for e in enc} | {len(e.chosen) for e in enc}) > 2, "response lengths must differ"
    return enc


def unpadded_logp(model, prompt, completion: list[int]) -> tuple[float, int]:
    """Full logits of one unpadded sequence; sum log p(completion token | everything before)."""
    ids = torch.tensor([prompt.ids + completion])
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, **prompt.vision).logits
    logps = logits[0, :-1].float().log_softmax(-1)
    start = len(prompt.ids)  # position start-1 predicts the first completion token
    total = sum(logps[start - 1 + j, tok].item() for j, tok in enumerate(completion))
    return total, len(completion)


def test_shared_prefix_equals_concatenated_and_unpadded(tiny_policy, encoded):
    model, processor = tiny_policy
    pad = processor.tokenizer.pad_token_id
    with torch.no_grad():
        shared = pair_logps(model, encoded, pad, shared_prefix=True)
        concat = pair_logps(model, encoded, pad, shared_prefix=False)
        single = [[unpadded_logp(model, e.prompt, c) for c in (e.chosen, e.rejected)] for e in encoded]
    expected_chosen = torch.tensor([s[0][0] for s in single])
    expected_rejected = torch.tensor([s[1][0] for s in single])
    for out in (shared, concat):
        torch.testing.assert_close(out.chosen, expected_chosen, atol=ATOL, rtol=0)
        torch.testing.assert_close(out.rejected, expected_rejected, atol=ATOL, rtol=0)
        assert out.chosen_tokens.tolist() == [s[0][1] for s in single]
        assert out.rejected_tokens.tolist() == [s[1][1] for s in single]
    torch.testing.assert_close(shared.chosen, concat.chosen, atol=ATOL, rtol=0)
    torch.testing.assert_close(shared.rejected, concat.rejected, atol=ATOL, rtol=0)


def test_more_than_two_continuations_share_one_prefix(tiny_policy, encoded):
    """n = 4 completions per prompt, one of them EOS only for every prompt (nothing to run
    after the prefix: its first-token logit is all it needs)."""
    model, processor = tiny_policy
    pad = processor.tokenizer.pad_token_id
    tok = processor.tokenizer
    extra = [completion_ids(tok, "yes"), completion_ids(tok, "a big blue triangle")]
    conts = [[e.chosen, e.rejected, extra[i % 2], completion_ids(tok, "")] for i, e in enumerate(encoded)]
    with torch.no_grad():
        logps, ntok = shared_prefix_logps(model, collate_shared([e.prompt for e in encoded], conts, pad))
        flat = [(e.prompt, c) for e, cs in zip(encoded, conts) for c in cs]
        expected, counts = sequence_logps(model, collate([p for p, _ in flat], [c for _, c in flat], pad))
    assert logps.shape == (len(encoded), 4) and ntok[:, 3].tolist() == [1] * len(encoded)
    torch.testing.assert_close(logps.flatten(), expected, atol=ATOL, rtol=0)
    assert ntok.flatten().tolist() == counts.tolist()


def test_gradients_equal_between_paths(tiny_policy, encoded):
    model = copy.deepcopy(tiny_policy[0]).requires_grad_(True)
    model.train()
    pad = tiny_policy[1].tokenizer.pad_token_id
    grads = []
    for shared_prefix in (True, False):
        model.zero_grad(set_to_none=True)
        out = pair_logps(model, encoded, pad, shared_prefix=shared_prefix)
        # a DPO-like objective: both responses, both signs, every pair
        (0.1 * (out.chosen - 0.7 * out.rejected)).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    shared, concat = grads
    assert shared.keys() == concat.keys()  # every parameter but CLIP's unused post_layernorm
    vision = [n for n in shared if "vision_tower" in n]
    assert vision and all(shared[n].abs().sum() > 0 for n in vision), "gradients must reach the prefix"
    for name in shared:
        torch.testing.assert_close(shared[name], concat[name], atol=ATOL, rtol=0, msg=name)


def test_activation_checkpointing_falls_back_to_concatenated(tiny_policy, encoded):
    """transformers drops the KV cache under activation checkpointing in training mode, so the
    shared-prefix engine refuses to run and pair_logps uses the concatenated path."""
    model = copy.deepcopy(tiny_policy[0]).requires_grad_(True)
    model.activation_checkpointing_enable()
    model.train()
    pad = tiny_policy[1].tokenizer.pad_token_id
    out = pair_logps(model, encoded, pad)
    with torch.no_grad():
        expected = pair_logps(tiny_policy[0], encoded, pad, shared_prefix=False)
    torch.testing.assert_close(out.chosen.detach(), expected.chosen, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.rejected.detach(), expected.rejected, atol=ATOL, rtol=0)
    shared = collate_shared([e.prompt for e in encoded], [[e.chosen] for e in encoded], pad)
    with pytest.raises(RuntimeError, match="activation checkpointing"):
        shared_prefix_logps(model, shared)


def test_counts_include_eos_and_masks_cover_only_the_response(tiny_policy, encoded):
    model, processor = tiny_policy
    tok, pad = processor.tokenizer, processor.tokenizer.pad_token_id
    image_id = model.config.image_token_id
    # A response of k text tokens counts k + 1 (EOS).
    for text in ("blue", "the red big circle is on the left"):
        k = len(tok(text, add_special_tokens=False)["input_ids"])
        ids = completion_ids(tok, text)
        assert len(ids) == k + 1 and ids[-1] == tok.eos_token_id
    # Concatenated path: the mask selects exactly the completion tokens, never image/prompt/pad.
    prompts = [e.prompt for e in encoded]
    comps = [e.rejected for e in encoded]
    batch = collate(prompts, comps, pad)
    for i, (p, c) in enumerate(zip(prompts, comps)):
        assert batch.completion_mask[i].sum() == len(c)
        assert batch.input_ids[i][batch.completion_mask[i]].tolist() == c
        assert not (batch.input_ids[i][batch.completion_mask[i]] == image_id).any()
    # Shared path: first token + real targets == the completion, counts == lengths.
    shared = collate_shared(prompts, [[c] for c in comps], pad)
    for i, c in enumerate(comps):
        real = shared.cont_targets[0, i][shared.target_mask[0, i]].tolist()
        assert [shared.first_targets[i, 0].item()] + real == c
        assert shared.n_tokens[i, 0] == len(c)
        assert shared.prompt_ids[i][shared.prompt_mask[i].bool()].tolist() == prompts[i].ids
        assert shared.last_index[i, 0] == len(prompts[i].ids) - 1


def test_sums_do_not_depend_on_padding_or_prompt_targets(tiny_policy, encoded):
    """Pad tokens are masked: another pad id gives the same sums. Prompt positions are not
    targets: the sum equals the completion tokens' log-probs alone (by hand, unpadded), and
    differs from it by exactly the prompt token's log-prob if that were counted."""
    model, processor = tiny_policy
    pad, eos = processor.tokenizer.pad_token_id, processor.tokenizer.eos_token_id
    with torch.no_grad():
        base = pair_logps(model, encoded, pad)
        other_pad = pair_logps(model, encoded, eos)
        other_pad_concat = pair_logps(model, encoded, eos, shared_prefix=False)
        torch.testing.assert_close(other_pad.chosen, base.chosen, atol=ATOL, rtol=0)
        torch.testing.assert_close(other_pad_concat.rejected, base.rejected, atol=ATOL, rtol=0)
        # One pair: sum over the response equals the by-hand response sum; the last prompt
        # token (a prompt "label") would add its own log-prob, which is not zero.
        e = encoded[0]
        ids = torch.tensor([e.prompt.ids + e.chosen])
        logps = model(input_ids=ids, use_cache=False, **e.prompt.vision).logits[0, :-1].log_softmax(-1)
        start = len(e.prompt.ids)
        response = sum(logps[start - 1 + j, t].item() for j, t in enumerate(e.chosen))
        prompt_label = logps[start - 2, e.prompt.ids[-1]].item()
    assert base.chosen[0].item() == pytest.approx(response, abs=ATOL)
    assert abs(prompt_label) > 1e-3  # counting it would be visible


def test_reference_logps_match_policy_pass(tiny_policy, encoded):
    model, processor = tiny_policy
    chosen, rejected = reference_logps(model, processor, encoded, batch_size=4)
    with torch.no_grad():
        out = pair_logps(model, encoded, processor.tokenizer.pad_token_id, shared_prefix=False)
    torch.testing.assert_close(torch.tensor(chosen), out.chosen, atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.tensor(rejected), out.rejected, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("shared_prefix", "counts"), [
    (True, r"127 image tokens .* 128 features \(2 images x 64 per image\)"),  # each prompt once
    (False, r"254 image tokens .* 256 features \(4 images x 64 per image\)"),  # [chosen; rejected]
])
def test_image_token_mismatch_is_a_clear_error(tiny_policy, encoded, shared_prefix, counts):
    model, processor = tiny_policy
    image_id = model.config.image_token_id
    broken = copy.deepcopy(encoded[:2])
    ids = broken[1].prompt.ids
    ids.pop(ids.index(image_id))  # one image token lost, e.g. by truncation
    with pytest.raises(ValueError, match=counts + ".*Fix"):
        pair_logps(model, broken, processor.tokenizer.pad_token_id, shared_prefix=shared_prefix)


def test_image_token_in_a_response_is_a_clear_error(tiny_policy, encoded):
    model, processor = tiny_policy
    broken = copy.deepcopy(encoded[:1])
    broken[0].chosen.insert(0, model.config.image_token_id)  # a sampled <image> token
    with pytest.raises(ValueError, match="image tokens and image features disagree"):
        pair_logps(model, broken, processor.tokenizer.pad_token_id, shared_prefix=False)
    with pytest.raises(ValueError, match="image tokens and image features disagree"):
        pair_logps(model, broken, processor.tokenizer.pad_token_id, shared_prefix=True)


def test_over_long_pairs_are_dropped_and_counted(tiny_policy):
    _, processor = tiny_policy
    pairs = make_pairs(4)
    lengths = [len(encode_prompt(processor, p["prompt"], p["images"]).ids) for p in pairs]
    limit = min(lengths) + 2  # room for a 1-token answer + EOS after the shortest prompt only
    enc, kept, dropped = encode_pairs(processor, pairs, max_length=limit)
    assert dropped == len(pairs) - len(kept) and dropped > 0
    for e in enc:  # kept pairs are whole: every image token is still there
        assert len(e.prompt.ids) + max(len(e.chosen), len(e.rejected)) <= limit
        assert e.prompt.ids.count(processor.tokenizer.convert_tokens_to_ids("<image>")) == 64
