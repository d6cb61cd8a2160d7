"""Chat formats: how one model's chat template turns a conversation into the tokens the model
reads, and which of those tokens it learns from.

Real templates differ in ways that break a pipeline silently, so each tokenizer's template is
probed once, when it is loaded (`ChatFormat(tokenizer, name)`), for:
- `system`: does it render a system turn, in the prompt and in a finished conversation alike?
  (Mistral v0.1/v0.2 raise on one; Mistral v0.3 shows it only in the last user turn.) If not, the
  system text is folded into the first user turn.
- `alternate`: must user and assistant turns alternate? If so, consecutive turns of one role are
  merged.
- `prefill`: does the generation prompt already open a reasoning block (DeepSeek-R1-Distill ends
  it with `<think>\\n`)? The model then writes only the rest, so generated text gets the prefill
  back before the reasoning is split from the answer.
- `keeps_reasoning`: does an assistant turn keep its `<think>...</think>` when rendered? R1's
  template strips it, which would train on answers without reasoning; training then uses a
  template that keeps it (the recipe's `sft.chat_template`, or the training variant trl ships).
A template that cannot express a conversation raises one InputError line naming the model.

Training tokens (`tokenize`): the conversation is rendered with the template, each assistant turn
is located by rendering up to it (with the generation prompt) and up to its end, and the text is
tokenised piece by piece: what comes before the assistant's content, then its content and
end-of-turn token. Tokenising the pieces apart, as trl's prompt-completion path does, puts the
loss boundary on a token boundary, exactly where generation starts at inference. Tokenising the
whole text at once does not: Mistral's `" [/INST]"` followed by `"<think>"` merges into one token
`]<`, and a character mask then drops it, so every example would be trained from `think>`.
Such merges are counted (`merged_boundary`), never trained on.
"""
from __future__ import annotations

import re
from pathlib import Path

from .records import InputError

Chat = list[dict]
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
SFT_FORMAT = THINK_OPEN + "\n{thoughts}\n" + THINK_CLOSE + "\n\n{response}"  # an assistant turn with reasoning

_OPENS_REASONING = re.compile(re.escape(THINK_OPEN) + r"\s*$")
_REASONS_THEN_ANSWERS = re.compile(r"^\s*" + re.escape(THINK_OPEN) + r"\s*\S.*?" + re.escape(THINK_CLOSE) + r"\s*\S", re.S)
_PROBE = {"system": "SYSTEM-PROBE", "user": "USER-PROBE", "assistant": "ASSISTANT-PROBE", "reasoning": "REASONING-PROBE"}


def reasons_then_answers(text: str) -> bool:
    """Non-empty reasoning in the think block, opening the turn, then a non-empty answer after it."""
    return bool(_REASONS_THEN_ANSWERS.match(text or ""))


def fold_system(chat: Chat) -> Chat:
    """Merge a system turn into the first user turn, for chat templates that have no system role."""
    if not chat or chat[0]["role"] != "system":
        return chat
    system, rest = chat[0]["content"], [dict(m) for m in chat[1:]]
    if rest and rest[0]["role"] == "user":
        rest[0]["content"] = f"{system}\n\n{rest[0]['content']}"
        return rest
    return [{"role": "user", "content": system}] + rest


def merge_runs(chat: Chat) -> Chat:
    """Consecutive turns of one role as one turn, for templates that need roles to alternate."""
    out: Chat = []
    for m in chat:
        if out and out[-1]["role"] == m["role"]:
            out[-1] = {**out[-1], "content": f"{out[-1]['content']}\n\n{m['content']}"}
        else:
            out.append(dict(m))
    return out


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class ChatFormat:
    """One tokenizer with one chat template (its own, or `template`), probed once."""

    def __init__(self, tokenizer, name: str, template: str | None = None):
        self.tokenizer, self.name, self.template = tokenizer, name, template
        user = {"role": "user", "content": _PROBE["user"]}
        try:
            prompt = self._render([user], add_generation_prompt=True)
        except Exception as e:  # jinja raises its own errors; any of them means the same here
            raise InputError(f"model '{name}': its chat template cannot render a single user turn: {_first_line(e)}") from None
        system = [{"role": "system", "content": _PROBE["system"]}, user]
        answer = {"role": "assistant", "content": _PROBE["assistant"]}
        self.system = (_PROBE["system"] in (self._try(system, True) or "")
                       and _PROBE["system"] in (self._try(system + [answer]) or ""))
        self.alternate = self._try([user, user], True) is None
        m = _OPENS_REASONING.search(prompt)
        self.prefill = m.group(0) if m else ""
        reasoning = {"role": "assistant", "content": SFT_FORMAT.format(thoughts=_PROBE["reasoning"], response=_PROBE["assistant"])}
        self.keeps_reasoning = _PROBE["reasoning"] in (self._try([user, reasoning]) or "")
        first = tokenizer.convert_ids_to_tokens(tokenizer("a", add_special_tokens=False)["input_ids"])
        # sentencepiece vocabularies (Llama 2, Mistral) put a word-start mark before the first piece
        # of any text tokenised alone: a piece tokenised apart must not start with a space of its own.
        self.prefix_space = bool(first) and first[0].startswith("\u2581")

    def describe(self) -> dict:
        """What was probed, for manifests and the README's table."""
        return {"system_turn": self.system, "roles_alternate": self.alternate, "prefill": self.prefill,
                "keeps_reasoning": self.keeps_reasoning}

    # ---- rendering ----------------------------------------------------------------------------

    def _render(self, chat: Chat, add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  chat_template=self.template)

    def _try(self, chat: Chat, add_generation_prompt: bool = False) -> str | None:
        try:
            return self._render(chat, add_generation_prompt)
        except Exception:
            return None

    def adapt(self, chat: Chat) -> Chat:
        """The conversation as this template can express it: system folded, runs merged."""
        chat = [dict(m) for m in chat]
        if not self.system:
            chat = fold_system(chat)
        if self.alternate:
            chat = merge_runs(chat)
        return chat

    def render(self, chat: Chat, add_generation_prompt: bool = False) -> str:
        """The adapted conversation as text; a template that refuses it is one clear line."""
        chat = self.adapt(chat)
        try:
            return self._render(chat, add_generation_prompt)
        except Exception as e:
            roles = "/".join(m["role"] for m in chat)
            raise InputError(f"model '{self.name}': its chat template cannot express a {roles} conversation: "
                             f"{_first_line(e)}") from None

    # ---- generation ---------------------------------------------------------------------------

    def prompt_ids(self, chats: list[Chat]) -> list[list[int]]:
        """Token ids of each conversation followed by the generation prompt."""
        texts = [self.render(c, add_generation_prompt=True) for c in chats]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]  # the template writes BOS itself

    def completion(self, text: str) -> str:
        """Generated text as the model's whole turn: with the reasoning prefill the prompt held."""
        if self.prefill and not text.lstrip().startswith(THINK_OPEN):
            return self.prefill + text
        return text

    # ---- training -----------------------------------------------------------------------------

    def _ids(self, text: str, after_text: bool) -> list[int]:
        if after_text and self.prefix_space and text.startswith(" "):
            text = text[1:]  # the tokenizer's word-start mark stands for this space
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def assistant_spans(self, chat: Chat) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the (start, end) characters of every assistant turn: from
        its content (a reasoning prefill of the generation prompt counts as content) to its
        end-of-turn token, trailing whitespace excepted."""
        text = self.render(chat)
        spans = []
        for i, m in enumerate(chat):
            if m["role"] != "assistant":
                continue
            before = self.render(chat[:i], add_generation_prompt=True)
            before = before[:len(before) - len(self.prefill)] if self.prefill else before
            upto = self.render(chat[:i + 1])
            if not (text.startswith(upto) and upto.startswith(before)):
                raise InputError(f"model '{self.name}': its chat template does not render conversations prefix by "
                                 "prefix, so the assistant turns cannot be located; give a training template "
                                 "with sft.chat_template=<file.jinja>")
            spans.append((len(before), len(upto.rstrip())))
        return text, spans

    def tokenize(self, chat: Chat) -> dict:
        """input_ids, assistant_masks (1 = a token the assistant wrote, end-of-turn included) and
        merged_boundary (the template's text merges into one token across an assistant turn's
        start when tokenised whole: tokenising the pieces apart kept it out of the loss)."""
        chat = self.adapt(chat)
        text, spans = self.assistant_spans(chat)
        ids, mask, cursor = [], [], 0
        for start, end in spans:
            for piece, learnt in ((text[cursor:start], 0), (text[start:end], 1)):
                piece_ids = self._ids(piece, after_text=bool(ids))
                ids += piece_ids
                mask += [learnt] * len(piece_ids)
            cursor = end
        tail = self._ids(text[cursor:], after_text=True)
        ids, mask = ids + tail, mask + [0] * len(tail)
        whole = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        merged = any(s < start < e for s, e in whole for start, _ in spans)
        return {"input_ids": ids, "assistant_masks": mask, "merged_boundary": merged}

    def tokenize_pair(self, prompt: Chat, chosen: Chat, rejected: Chat) -> dict:
        """A preference pair as trl's DPO collator takes it: prompt_ids, then chosen_ids and
        rejected_ids that start exactly at the assistant's content and end at its end of turn."""
        out, merged = {}, False
        for key, answer in (("chosen", chosen), ("rejected", rejected)):
            enc = self.tokenize(prompt + answer)
            learnt = [i for i, m in enumerate(enc["assistant_masks"]) if m]
            if not learnt:
                raise InputError(f"model '{self.name}': a preference pair has no assistant tokens")
            first, last = learnt[0], learnt[-1] + 1
            if "prompt_ids" in out and out["prompt_ids"] != enc["input_ids"][:first]:
                raise InputError(f"model '{self.name}': the chosen and rejected sides render the prompt differently")
            out["prompt_ids"], out[f"{key}_ids"] = enc["input_ids"][:first], enc["input_ids"][first:last]
            merged = merged or enc["merged_boundary"]
        return {**out, "merged_boundary": merged}


def training_template(fmt: ChatFormat, template_file: str | None) -> str | None:
    """The chat template to train with: the recipe's file if it names one; else the model's own
    if it keeps the reasoning of assistant turns; else the training variant trl ships for the
    family (DeepSeek-R1-Distill's keeps the `<think>` block); else a clear error."""
    if template_file:
        if not Path(template_file).is_file():
            raise InputError(f"{template_file}: chat template file not found")
        return Path(template_file).read_text(encoding="utf-8")
    if fmt.keeps_reasoning:
        return None
    from trl.chat_template_utils import get_training_chat_template
    try:
        template = get_training_chat_template(fmt.tokenizer)
    except ValueError:  # trl has no variant for this template
        template = None
    if template is None or not ChatFormat(fmt.tokenizer, fmt.name, template).keeps_reasoning:
        raise InputError(f"model '{fmt.name}': its chat template drops the reasoning (<think>...</think>) from "
                         "assistant turns and trl ships no training variant for it; give one that keeps it with "
                         "sft.chat_template=<file.jinja>")
    return template


def training_format(tokenizer, name: str, template_file: str | None = None) -> ChatFormat:
    """The format stages 3 and 4 train with (see training_template)."""
    own = ChatFormat(tokenizer, name)
    template = training_template(own, template_file)
    return own if template is None else ChatFormat(tokenizer, name, template)
