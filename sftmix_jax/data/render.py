"""Rows -> chat messages -> prompt text -> tokens with a response mask.

Rows (Alpaca, messages or ShareGPT) become a list of chat messages; the chat template (or the
Stanford Alpaca prompt) renders them; the loss mask covers exactly the tokens of every assistant
turn, found as token differences between renderings of conversation prefixes.
"""
from __future__ import annotations

import json
from typing import Sequence

import numpy as np
from absl import logging

_INVALID = "__invalid_json_line__"  # marks a JSONL line that did not parse: a counted bad row


class BadRow(Exception):
    """A row that cannot become a training example; args[0] is the reason counted."""


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant", "system": "system"}
_ROLES = ("system", "user", "assistant")


def _get(row: dict, key: str, allow_none: bool = True):
    # An absent column is often a wrong field name: name it. (datasets fills None for
    # keys missing from some rows, so None is missing too where a value is required.)
    if key not in row or (row[key] is None and not allow_none):
        raise BadRow(f"missing_field:{key}")
    return row[key]


def _message(role, content) -> dict:
    if role not in _ROLES:
        raise BadRow("unknown_role")
    if role == "assistant":
        if not isinstance(content, str) or not content.strip():
            raise BadRow("empty_response")
    elif not isinstance(content, str):
        raise BadRow("bad_field")
    return {"role": role, "content": content}


def row_to_messages(row: dict, fmt: str, fields) -> list[dict]:
    """One row -> [{'role', 'content'}], ending at the last assistant turn; raises BadRow."""
    if _INVALID in row:
        raise BadRow("invalid_json")
    if fmt == "alpaca":
        instruction = _get(row, fields.instruction, allow_none=False)
        inp = row.get(fields.input) or ""
        if not isinstance(instruction, str) or not isinstance(inp, str):
            raise BadRow("bad_field")
        user = "\n\n".join(p for p in (instruction, inp) if p.strip())
        if not user:
            raise BadRow("empty_prompt")
        # instruction/input ride along for the 'alpaca' template; the chat path drops them.
        messages = [dict(_message("user", user), instruction=instruction, input=inp),
                    _message("assistant", _get(row, fields.output))]
    elif fmt in ("messages", "sharegpt"):
        sharegpt = fmt == "sharegpt"
        conv = _get(row, fields.conversations if sharegpt else fields.messages)
        if conv is None or (isinstance(conv, (list, tuple)) and not conv):
            raise BadRow("empty_conversation")
        if not isinstance(conv, (list, tuple)) or not all(isinstance(m, dict) for m in conv):
            raise BadRow("bad_field")
        role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
        messages = []
        for m in conv:
            role = m.get(role_key)
            role = _SHAREGPT_ROLES.get(role, role) if sharegpt else role
            messages.append(_message(role, m.get(content_key)))
    elif fmt == "prompt_completion":  # TRL's: two strings, or two lists of messages
        prompt, completion = _get(row, fields.prompt, allow_none=False), _get(row, fields.completion, allow_none=False)
        if isinstance(prompt, str) and isinstance(completion, str):
            messages = [_message("user", prompt), _message("assistant", completion)]
        elif isinstance(prompt, list) and isinstance(completion, list) and all(
                isinstance(m, dict) for m in prompt + completion):
            messages = [_message(m.get("role"), m.get("content")) for m in prompt + completion]
        else:
            raise BadRow("bad_field")
    else:
        raise ValueError(f"data.format={fmt!r}; expected 'alpaca', 'messages', 'sharegpt' or 'prompt_completion'")
    last = max((k for k, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    if last < 0:
        raise BadRow("no_assistant_turn")
    return messages[: last + 1]  # Trailing user turns carry no loss.


# ----------------------------------------------------------------------------------------
# Templates and the response mask
# ----------------------------------------------------------------------------------------

# Stanford Alpaca's prompts (tatsu-lab/stanford_alpaca train.py), with a newline after
# "### Response:" as in alpaca-lora and most re-implementations.
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")
ALPACA_PREAMBLE_INPUT = ("Below is an instruction that describes a task, paired with an input "
                         "that provides further context. "
                         "Write a response that appropriately completes the request.")


def render_alpaca(messages: Sequence[dict], eos_token: str, add_generation_prompt: bool) -> str:
    """The Alpaca prompt; a chat repeats Instruction/Response blocks, EOS after each reply."""
    first = next((m for m in messages if m["role"] == "user"), {})
    if messages and messages[0]["role"] == "system":
        text = messages[0]["content"]
    else:
        text = ALPACA_PREAMBLE_INPUT if first.get("input") else ALPACA_PREAMBLE
    for m in messages:
        if m["role"] == "user":
            if "instruction" in m and m.get("input"):
                text += f"\n\n### Instruction:\n{m['instruction']}\n\n### Input:\n{m['input']}"
            else:
                text += f"\n\n### Instruction:\n{m['content']}"
        elif m["role"] == "assistant":
            text += f"\n\n### Response:\n{m['content']}{eos_token}"
    return text + ("\n\n### Response:\n" if add_generation_prompt else "")


def _jinja_str(text: str) -> str:
    return "{{ " + json.dumps(text) + " }}"  # a Jinja string literal reads JSON escapes (\n) as Python does


# render_alpaca as a chat template: exported with Alpaca-trained models, so that
# tokenizer.apply_chat_template (vLLM's chat endpoint, lm-eval's --apply_chat_template, our generate)
# renders the prompt the model was trained on.
ALPACA_CHAT_TEMPLATE = (
    "{%- set users = messages | selectattr('role', 'equalto', 'user') | list -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}{{ messages[0]['content'] }}"
    "{%- elif users and users[0].get('input') -%}" + _jinja_str(ALPACA_PREAMBLE_INPUT) +
    "{%- else -%}" + _jinja_str(ALPACA_PREAMBLE) + "{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' and m.get('instruction') is not none and m.get('input') -%}"
    + _jinja_str("\n\n### Instruction:\n") + "{{ m['instruction'] }}" + _jinja_str("\n\n### Input:\n") + "{{ m['input'] }}"
    "{%- elif m['role'] == 'user' -%}" + _jinja_str("\n\n### Instruction:\n") + "{{ m['content'] }}"
    "{%- elif m['role'] == 'assistant' -%}" + _jinja_str("\n\n### Response:\n") + "{{ m['content'] }}{{ eos_token }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}" + _jinja_str("\n\n### Response:\n") + "{%- endif -%}"
)


def render(tokenizer, template: str, messages: list[dict], add_generation_prompt: bool) -> str:
    if template == "alpaca":
        return render_alpaca(messages, tokenizer.eos_token, add_generation_prompt)
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    try:
        return tokenizer.apply_chat_template(
            plain, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # Templates raise on roles/orders they refuse; count the row.
        logging.log_first_n(logging.WARNING, "chat template refused a row: %s", 3, e)
        raise BadRow("template_error") from e


def render_turns(messages: list[dict], tokenizer, template: str) -> list[str]:
    """[prompt_0, full_0, prompt_1, full_1, ...], one pair per assistant turn k.

    prompt_k renders messages[:k] with the generation prompt, full_k renders messages[:k+1];
    turn k's tokens are those of full_k beyond prompt_k. A template whose renderings are not
    prefixes of one another (one that rewrites earlier turns) cannot be masked: raise.
    """
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    texts = []
    for k in turns:
        texts += [render(tokenizer, template, messages[:k], True),
                  render(tokenizer, template, messages[: k + 1], False)]
    for j, text in enumerate(texts):
        if not texts[-1].startswith(text) or (j % 2 and not text.startswith(texts[j - 1])):
            raise ValueError(
                f"the {template!r} template breaks the prefix property at assistant turn "
                f"{j // 2} (it rewrites earlier turns?), so response tokens cannot be "
                f"located; rendered prefix: {text[-200:]!r}")
    return texts


def mask_turns(encoded: list[list[int]], eos_id: int | None = None):
    """Token ids of render_turns' texts -> (input_ids, loss_mask, prompt_len of the last turn).

    A string prefix whose tokens are no prefix (a merge across the prompt/response boundary)
    is this row's problem, not the template's: BadRow. eos_id: check each turn ends in it.
    """
    ids = encoded[-1]
    mask_L = np.zeros(len(ids), np.int8)
    end = 0
    for prompt, full in zip(encoded[0::2], encoded[1::2]):
        if not (end <= len(prompt) < len(full) and ids[: len(full)] == full
                and full[: len(prompt)] == prompt):
            raise BadRow("token_boundary")
        if eos_id is not None and full[-1] != eos_id:
            raise ValueError("the tokenizer does not encode its eos_token text as the EOS id")
        mask_L[len(prompt): len(full)] = 1
        end = len(full)
    return np.asarray(ids, np.int32), mask_L, len(encoded[-2])


# ----------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------
