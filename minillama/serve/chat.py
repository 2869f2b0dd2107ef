"""Chat messages -> prompt token ids: the checkpoint's chat template when it has one, else the plain template.

The checkpoint's template is Hugging Face's: `chat_template.jinja`, or `chat_template` in tokenizer_config.json
(a string, or a list of named templates of which "default" is taken), rendered as transformers renders it (a
sandboxed Jinja2 environment with trim_blocks and lstrip_blocks; `messages`, `add_generation_prompt=True`,
`bos_token`, `eos_token` and `raise_exception` in scope). The rendered text holds control tokens as text (e.g.
`<|start_header_id|>`); they are encoded as the control tokens they name, the rest as text, as transformers does.

The plain template, for checkpoints without one (a base model has no chat format of its own):

    BOS + "system: {content}\\n" + "user: {content}\\n" + "assistant: {content}\\n" ... + "assistant:"

one line per message, `role: content`, and the assistant's turn left open for the model to continue.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from minillama.errors import MinillamaError

CONTROL_TOKEN = re.compile(r"<\|[^<>|\s]{1,64}\|>")  # Llama 3's and most templates' spelling of control tokens


def plain_chat_text(messages: Sequence[dict[str, str]]) -> str:
    """The plain template's text for messages ({role, content}); the caller adds BOS."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class ChatFormatter:
    """Turns OpenAI chat messages into prompt ids for one checkpoint's tokenizer."""

    def __init__(self, tokenizer: Any, template: str | None = None, bos_token: str | None = None,
                 eos_token: str | None = None, special_tokens: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.template_source = template
        self.bos_token, self.eos_token = bos_token, eos_token
        self.special_tokens = tuple(special_tokens)
        self._template = None
        if template is not None:
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_template_error
            try:
                self._template = env.from_string(template)
            except TemplateError as exc:
                raise MinillamaError(f"the checkpoint's chat template does not parse: {exc}") from None

    @classmethod
    def from_checkpoint(cls, directory: str | Path, tokenizer: Any) -> ChatFormatter:
        """The formatter a checkpoint directory asks for (its template, if any, and its special tokens)."""
        directory = Path(directory)
        config: dict[str, Any] = {}
        config_path = directory / "tokenizer_config.json"
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise MinillamaError(f"{config_path}: cannot read as JSON ({exc})") from None
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        jinja_file = directory / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        added = config.get("added_tokens_decoder", {})
        specials = [_token_content(t) for t in added.values()] if isinstance(added, dict) else []
        return cls(tokenizer, template if isinstance(template, str) else None,
                   bos_token=_token_content(config.get("bos_token")), eos_token=_token_content(config.get("eos_token")),
                   special_tokens=[s for s in specials if s])

    @property
    def template_name(self) -> str:
        return "the checkpoint's chat template" if self._template is not None else "the plain chat template"

    def prompt_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of the conversation with the assistant's turn open."""
        if self._template is None:
            return self.tokenizer.encode(plain_chat_text(messages), bos=self.tokenizer.bos_id is not None)
        from jinja2 import TemplateError

        try:
            text = self._template.render(messages=list(messages), add_generation_prompt=True,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except TemplateError as exc:
            raise MinillamaError(f"the chat template refused these messages: {exc}") from None
        return self.encode_with_control_tokens(text)

    def encode_with_control_tokens(self, text: str) -> list[int]:
        """Ids of rendered template text: control tokens named in it become their ids, the rest is text."""
        names = {self.bos_token, self.eos_token, *self.special_tokens, *CONTROL_TOKEN.findall(text)}
        control = {n: self.tokenizer.token_to_id(n) for n in names if n}
        control = {n: i for n, i in control.items() if i is not None}
        if not control:
            return self.tokenizer.encode(text)
        pattern = re.compile("|".join(re.escape(n) for n in sorted(control, key=len, reverse=True)))
        ids: list[int] = []
        start = 0
        for match in pattern.finditer(text):
            if match.start() > start:
                ids += self.tokenizer.encode(text[start:match.start()])
            ids.append(control[match.group()])
            start = match.end()
        if start < len(text):
            ids += self.tokenizer.encode(text[start:])
        return ids


def _raise_template_error(message: str) -> None:
    from jinja2 import TemplateError

    raise TemplateError(message)


__all__ = ["ChatFormatter", "plain_chat_text"]
