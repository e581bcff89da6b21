"""Request bodies of the OpenAI-compatible API, validated by pydantic (strict types, unknown fields refused).

Fields OpenAI defines but dynamoe cannot honour (penalties, logit_bias, best_of, suffix) are accepted
only at their neutral value, so a client that sends the default still works and one that relies on
them gets a clear 400 instead of silently different behaviour. Every string of a body must be
encodable as UTF-8: JSON can spell a lone surrogate (`"\\ud800"`), which no tokenizer can take.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator
from pydantic_core import PydanticCustomError

from dynamoe.serve.dial import ReasoningEffort

MAX_SEED = 2**63 - 1
MAX_STOP_STRINGS = 4
MAX_LOGPROBS = 20
MAX_CHOICES = 16
INVALID_UNICODE = "invalid_unicode"  # the pydantic error type of a string UTF-8 cannot encode


class Strict(BaseModel):
    """Base of every request body: strict types, no NaN or infinity, no unknown fields."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class Body(Strict):
    """Base of a whole request body: its strings, field names included, must be encodable as UTF-8."""

    @model_validator(mode="before")
    @classmethod
    def text_is_unicode(cls, data: Any) -> Any:
        # Serialising is one pass in C over every string and field name; a body that fails is walked to name the field.
        if is_text(json.dumps(data, ensure_ascii=False, default=repr)):
            return data
        param = ".".join(unencodable(data) or ())
        raise PydanticCustomError(
            INVALID_UNICODE, "{where} holds a lone surrogate (a JSON escape such as \\ud800 without its pair), "
                             "which is not text; send valid Unicode", {"param": param, "where": param or "the body"})


def unencodable(value: Any, path: tuple[str, ...] = ()) -> tuple[str, ...] | None:
    """The path to the first string (or field name) in a parsed JSON value that UTF-8 cannot encode, else None."""
    if isinstance(value, str):
        return None if is_text(value) else path
    if isinstance(value, dict):
        if not all(map(is_text, value)):
            return path
        children = value.items()
    elif isinstance(value, list):
        children = enumerate(value)
    else:
        return None
    for key, item in children:
        found = unencodable(item, (*path, str(key))) if isinstance(item, (str, list, dict)) else None
        if found is not None:
            return found
    return None


def is_text(value: str) -> bool:
    """Whether UTF-8 can encode the string: not if it holds a lone surrogate."""
    if value.isascii():  # O(1): CPython records it
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class DialOptions(Strict):
    """dynamoe's extension: the compute dial of this request, and what it reports about the experts it used."""

    threshold: Annotated[float, Field(gt=0, le=1)] | None = None
    experts_per_layer: bool = False  # usage.experts_per_layer: experts per generated token, one mean per MoE layer
    token_experts: bool = False  # streamed token chunks carry each token's experts (choice.dynamoe.experts)


class StreamOptions(Strict):
    include_usage: bool = False


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


def prompt_form(value: Any) -> str:
    """Which form of Prompt a value has, by its first item: so that a long list is validated once, not per form."""
    first = value[0] if isinstance(value, list) and value else None
    # The tags are the forms' type names, which errors.validation_message recognises as a union's members.
    return {str: "list[str]", int: "list[int]", list: "list[list[int]]"}.get(type(first), "str")


Prompt = Annotated[Union[Annotated[str, Tag("str")], Annotated[list[str], Field(min_length=1), Tag("list[str]")],
                         Annotated[TokenIds, Tag("list[int]")],
                         Annotated[list[TokenIds], Field(min_length=1), Tag("list[list[int]]")]],
                   Discriminator(prompt_form)]
Stop = Union[Annotated[str, Field(min_length=1)],
             Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP_STRINGS)], None]


class SamplingFields(Body):
    """What completions and chat completions share."""

    model: str | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=0)] = 0  # an extension (as in vLLM): 0 keeps every token
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    stop: Stop = None
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored, as it only tags requests for OpenAI's abuse monitoring
    presence_penalty: Literal[0, 0.0] = 0
    frequency_penalty: Literal[0, 0.0] = 0
    logit_bias: Annotated[dict[str, float], Field(max_length=0)] | None = None
    reasoning_effort: ReasoningEffort | None = None  # OpenAI's compute setting, mapped onto the dial (serve/dial.py)
    dynamoe: DialOptions | None = None

    def stop_strings(self) -> tuple[str, ...]:
        """The stop strings as a tuple (empty when none)."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: Prompt
    max_tokens: Annotated[int, Field(ge=0)] | None = 16
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    best_of: Literal[1] | None = None
    suffix: None = None


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant"]
    content: Union[str, Annotated[list[TextPart], Field(min_length=1)]]
    name: str | None = None

    def text(self) -> str:
        """The message's text, its parts joined."""
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None

    @field_validator("messages")
    @classmethod
    def last_message_not_from_assistant(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if messages[-1].role == "assistant":
            raise ValueError("the last message must be from the user or the system; the reply is the assistant's turn")
        return messages


class TokenizeRequest(Body):
    """POST /tokenize (vLLM's shape, which lm-eval's remote tokenizer uses)."""

    prompt: str
    add_special_tokens: bool = False
    model: str | None = None


class DetokenizeRequest(Body):
    """POST /detokenize."""

    tokens: list[Annotated[int, Field(ge=0)]]
    model: str | None = None
