"""The records that flow between stages, defined once.

They are plain dicts (TypedDicts) so they serialise to JSON lines and to Hugging Face
datasets without conversion. Pair columns follow TRL's conversational preference format
(``prompt``, ``chosen``, ``rejected``, ``images``) so a pair set loads in other tools
unchanged.

Shapes:
- Query: one image + one question; ``answer`` and ``boxes`` are optional (None / []).
  ``boxes`` are pixel [x0, y0, x1, y1]; ``target_box`` is the box of the object the
  question is about ([] when the question concerns the whole image).
- Candidate: one generated response to a query's prompt. ``extras`` carries what the
  method needs to pair it later (e.g. SeVa's augmentation name, the sampling index).
- Scored: a candidate plus a score in [0, 1] and the judge's parts.
- Pair: a chat prompt, the images, one chosen and one rejected assistant message (and
  optionally more rejected texts for multi-negative losses), both scores, and the
  reference log-probs filled in by the pair stage.
"""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict


class Query(TypedDict):
    id: str
    image: Any  # PIL.Image.Image
    question: str
    answer: str | None
    qtype: str
    boxes: list[list[float]]
    target_box: list[float]
    source: str


class Candidate(TypedDict):
    query_id: str
    candidate_id: str
    prompt: list[dict]
    response: str
    extras: dict


class Scored(Candidate):
    score: float
    score_parts: dict


class Pair(TypedDict):
    pair_id: str
    query_id: str
    prompt: list[dict]
    images: list[Any]
    chosen: list[dict]
    rejected: list[dict]
    score_chosen: float
    score_rejected: float
    rejected_extra: list[str]  # further rejected texts for multi-negative losses ([] if none)
    method: str
    extras: NotRequired[dict]  # method metadata (e.g. UV-CoT's step, boxes and best chain)


def user_prompt(question: str, n_images: int = 1) -> list[dict]:
    """Chat messages for one user turn: the image placeholders first, then the text."""
    content = [{"type": "image", "text": None} for _ in range(n_images)]
    content.append({"type": "text", "text": question})
    return [{"role": "user", "content": content}]


def assistant_message(text: str) -> list[dict]:
    """One assistant turn, in the same message shape TRL expects for chosen/rejected."""
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


def message_text(messages: list[dict]) -> str:
    """The concatenated text of a list of messages (images skipped)."""
    parts = []
    for message in messages:
        for item in message["content"]:
            if item.get("type") == "text" and item.get("text"):
                parts.append(item["text"])
    return " ".join(parts)


def group_by_query(scored: list[Scored]) -> dict[str, list[Scored]]:
    """Scored candidates grouped by query id, in first-seen order (methods pair within a query)."""
    groups: dict[str, list[Scored]] = {}
    for s in scored:
        groups.setdefault(s["query_id"], []).append(s)
    return groups
