"""Instruction and chat rows -> token ids with loss labels (-100 where no loss is taken).

* ``instruction`` (Alpaca): ``instruction``, optional ``input``, ``output`` (field names from
  ``data.*_field``) become a user turn (instruction, a blank line, input) and an assistant turn
  (output), rendered like a chat;
* ``chat``: ``messages: [{role, content}, ...]`` (OpenAI style; ShareGPT's ``from``/``value``
  are accepted too), roles mapped through ``data.roles``.

A conversation is rendered with the tokenizer's own chat template (``apply_chat_template``),
or ``data.chat_template`` (a Jinja template, or ``chatml``) where the tokenizer has none or the
config sets one. Labels cover each assistant turn's rendered span (its content and the
template's end-of-turn tokens) unless ``data.train_on_prompt``. The spans are found in the
rendered text (rendering the conversation up to each turn) and mapped to tokens through the
tokenizer's offsets, so a template's special tokens land where the template puts them.
"""

from __future__ import annotations

from dataclasses import dataclass

from raclora_dist.config import ConfigError, DataSection

IGNORE = -100  # label of a token without loss (PyTorch's cross_entropy ignore_index)

# ChatML (<|im_start|>role ... <|im_end|>): a common template for tokenizers that have none.
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEMPLATES = {"chatml": CHATML}


@dataclass
class Example:
    """One tokenized example: ``ids`` and ``labels`` of equal length (labels -100 on prompt)."""

    ids: list[int]
    labels: list[int]

    @property
    def trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def detect_format(columns: list[str], dcfg: DataSection) -> str:
    """``data.format``, or for ``auto`` the format the columns call for."""
    if dcfg.format not in ("auto", "jsonl"):
        return dcfg.format
    if dcfg.format == "auto" and dcfg.messages_field in columns:
        return "chat"
    if dcfg.format == "auto" and dcfg.instruction_field in columns and dcfg.output_field in columns:
        return "instruction"
    return "text"


def chat_template(tokenizer, dcfg: DataSection) -> str:
    """The template conversations are rendered with (the config's, else the tokenizer's)."""
    if dcfg.chat_template is not None:
        return TEMPLATES.get(dcfg.chat_template, dcfg.chat_template)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    raise ConfigError("data.chat_template: the tokenizer has no chat template; set data.chat_template to 'chatml' "
                      "or to a Jinja template")


def row_where(source: str, row: int) -> str:
    """How errors name a row: ``"FILE, row N"`` (1-based)."""
    return f"{source}, row {row + 1}"


def instruction_messages(row: dict, dcfg: DataSection, where: str) -> list[dict]:
    """An Alpaca row as a user turn and an assistant turn."""
    for field in (dcfg.instruction_field, dcfg.output_field):
        value = row.get(field)
        if not isinstance(value, str):
            raise ConfigError(f"{where}: field {field!r} is missing or not text")
    if not row[dcfg.output_field].strip():
        raise ConfigError(f"{where}: field {dcfg.output_field!r} (the response) is empty")
    prompt = row[dcfg.instruction_field]
    extra = row.get(dcfg.input_field)
    if isinstance(extra, str) and extra.strip():
        prompt = f"{prompt}\n\n{extra}"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row[dcfg.output_field]}]


def chat_messages(row: dict, dcfg: DataSection, where: str) -> list[dict]:
    """A chat row's messages with roles mapped to system/user/assistant (checked)."""
    messages = row.get(dcfg.messages_field)
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: field {dcfg.messages_field!r} is missing or not a list of messages")
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ConfigError(f"{where}: message {k + 1} is not an object with role and content")
        role, content = m.get("role", m.get("from")), m.get("content", m.get("value"))
        if role not in dcfg.roles:
            raise ConfigError(f"{where}: message {k + 1} has role {role!r}; data.roles allows "
                              f"{', '.join(sorted(dcfg.roles))}")
        if not isinstance(content, str):
            raise ConfigError(f"{where}: message {k + 1} has no text content")
        out.append({"role": dcfg.roles[role], "content": content})
    answers = [m for m in out if m["role"] == "assistant"]
    if not answers:
        raise ConfigError(f"{where}: the conversation has no assistant message to train on")
    if any(not m["content"].strip() for m in answers):
        raise ConfigError(f"{where}: an assistant message (a response) is empty")
    return out


class ChatEncoder:
    """Renders conversations with a template and labels the assistant spans."""

    def __init__(self, tokenizer, dcfg: DataSection) -> None:
        self.tok, self.dcfg = tokenizer, dcfg
        self.template = chat_template(tokenizer, dcfg)
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError(f"data.tokenizer: {dcfg.tokenizer!r} is not a fast tokenizer; chat and instruction data "
                              "need token offsets")

    def render(self, messages: list[dict], generation_prompt: bool = False) -> str:
        return self.tok.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                            add_generation_prompt=generation_prompt)

    def spans(self, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character spans of its assistant turns."""
        text = self.render(messages)
        spans = []
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = len(self.render(messages[:k], generation_prompt=True)) if k else 0
            end = len(self.render(messages[: k + 1]))
            if not text.startswith(self.render(messages[: k + 1])):
                raise ConfigError(f"{where}: the chat template does not render the conversation "
                                  "turn by turn (a shorter conversation is not a prefix of the whole); choose another "
                                  "data.chat_template")
            spans.append((start, end))
        return text, spans

    def encode(self, messages: list[dict], where: str) -> Example:
        text, spans = self.spans(messages, where)
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = [IGNORE] * len(ids)
        for t, (a, _) in enumerate(enc["offset_mapping"]):
            if self.dcfg.train_on_prompt or any(s <= a < e for s, e in spans):
                labels[t] = ids[t]
        return Example(ids, labels)
