"""The chat template: how a list of messages becomes one prompt for a base language model.

dynamoe models are trained on plain text, so the template is plain text too::

    {system message}\\n\\n          (only if there is one)
    User: {user message}\\n\\n
    Assistant: {assistant message}\\n\\n
    ...
    Assistant:

The reply is the continuation of that last line; it ends at the end-of-text token or at the
next "\\nUser:" line, which the server adds to the request's stop strings.
"""

from __future__ import annotations

from typing import Iterable

ROLE_PREFIX = {"user": "User: ", "assistant": "Assistant: "}
REPLY_PREFIX = "Assistant:"
CHAT_STOP = "\nUser:"

# The same template for clients that render prompts themselves (lm-eval reads it from /tokenizer_info).
JINJA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n\n"
    "{% else %}Assistant: {{ message['content'] }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def render_chat(messages: Iterable[tuple[str, str]], add_generation_prompt: bool = True) -> str:
    """The prompt for (role, content) messages; roles are system, user or assistant."""
    parts = [content + "\n\n" if role == "system" else ROLE_PREFIX[role] + content + "\n\n" for role, content in messages]
    return "".join(parts) + (REPLY_PREFIX if add_generation_prompt else "")
