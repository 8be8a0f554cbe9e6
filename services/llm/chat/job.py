"""A chat request once it is validated: what the chat service answers, what the response
cache keys, and what text-to-SQL submits."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.llm.chat.schemas import RagOptions
from services.llm.conversations.store import Conversation
from services.llm.engine import Message, Params, Prompt


@dataclass
class Job:
    """A validated request."""

    messages: list[Message]
    params: Params
    rag: RagOptions | None = None
    context: list[str] = field(default_factory=list)
    subject: str = ""
    """Whose memories the answer may use (the caller's own and shared ones), and whose
    cached prefixes its prompt may start from."""
    reveal: bool = True
    """Whether ``sources`` may show the memories' text and metadata (scope rag:read)."""
    conversation: Conversation | None = None
    """The stored conversation this turn continues: its summary and the turns the
    summary does not cover go in front of ``messages``."""
    use_cache: bool = True
    """False: answer afresh (the request said ``Cache-Control: no-cache``)."""
    cache_key: str | None = None
    model: str = ""
    """The model the request names ("" or the local model's id: the local model)."""
    route: str | None = None
    """The request's routing hint, matched against the backends file's ``hint`` rules."""
    shared_prefix: list[Message] | None = None
    """Messages the service wrote, the same for every user (text-to-SQL's instructions
    and examples): as far as the prompt's tokens start with theirs, any user may reuse
    them from the KV cache."""
    raw: Prompt | None = None
    """A completion's prompt (``POST /v1/completions``): its tokens are read as they are,
    with no template, memories or conversation."""
    group: str | None = None
    """The request whose choices (``n``) this job is one of: they read the prompt once."""

    def before(self) -> list[Message]:
        """What goes in front of ``messages``: the conversation's history (its summary and
        the turns the summary does not cover)."""
        return self.conversation.history() if self.conversation is not None else []
