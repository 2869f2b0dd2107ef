"""OpenAI's API as data: request bodies (pydantic models, so FastAPI checks them and the OpenAPI schema is real),
the error shape, and the response and stream-chunk objects built from the engine's outputs.

Requests follow OpenAI's reference for /v1/completions and /v1/chat/completions. Fields a client may send that
the engine has no use for (user, logit_bias left empty, ...) are accepted and ignored; ones that would change the
answer and are not supported (echo, best_of > n, tools, a non-empty logit_bias) are refused with a 400 naming them.
`top_k` and `ignore_eos` are accepted as extensions, as vLLM does.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from minillama.infer.engine import Completion
from minillama.infer.sampling import MAX_TOP_LOGPROBS, TokenLogprob

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_STOP_CHARS = 256  # per stop string: held-back text is at most this long
MAX_SEED = 2**63 - 1  # SamplingParams takes seeds in [0, 2**63)


# --------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------
def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# --------------------------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------------------------
Stop = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """What both endpoints take."""

    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields we ignore

    model: str = Field(description="a name from GET /v1/models")
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate at most; prompt + max_tokens must "
                                                           "fit the context")
    temperature: float | None = Field(None, ge=0, le=2, description="0 is greedy (default 1)")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1, description="an extension (as vLLM): keep the k most likely tokens")
    ignore_eos: bool = Field(False, description="an extension (as vLLM): generate past the end-of-text token")
    n: int = Field(1, ge=1, description="completions per prompt (at most the server's --max-batch)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop | list[Stop] | None = Field(None, description=f"at most {MAX_STOP_STRINGS} strings")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(SamplingFields):
    prompt: str | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="the n most likely tokens' "
                                                                               "log-probabilities per position")
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Any] | None = None


# --------------------------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class TokenText:
    """Token ids as the text of each alone (what OpenAI's logprobs show per token)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


def completion_logprobs(logprobs: list[TokenLogprob], token_text: TokenText, offset: int = 0) -> dict[str, Any]:
    """/v1/completions' logprobs object (tokens, token_logprobs, top_logprobs, text_offset)."""
    tokens = [token_text(lp.token_id) for lp in logprobs]
    offsets, position = [], offset
    for text in tokens:
        offsets.append(position)
        position += len(text)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{token_text(t): v for t, v in lp.top} for lp in logprobs], "text_offset": offsets}


def chat_logprobs(logprobs: list[TokenLogprob], token_text: TokenText) -> dict[str, Any]:
    """/v1/chat/completions' logprobs object ({content: [{token, logprob, bytes, top_logprobs}]})."""
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in logprobs]}


def completion_choice(index: int, completion: Completion, logprobs: dict[str, Any] | None) -> dict[str, Any]:
    return {"index": index, "text": completion.text, "logprobs": logprobs,
            "finish_reason": completion.finish_reason}


def chat_choice(index: int, completion: Completion, logprobs: dict[str, Any] | None) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": completion.text}, "logprobs": logprobs,
            "finish_reason": completion.finish_reason}


__all__ = ["CompletionRequest", "ChatCompletionRequest", "ChatMessage", "StreamOptions", "error_body", "usage",
           "completion_logprobs", "chat_logprobs", "completion_choice", "chat_choice", "new_id", "now_s",
           "TokenText", "MAX_STOP_STRINGS"]
