"""``POST /v1/responses``: translated into a chat request, answered by the chat service,
rendered in the Responses shapes; a stored response is a conversation turn (store.py)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response

from services.llm.chat.answer import Done
from services.llm.chat.routes import Chat, Chatter, Conversations, Translate, answer_whole, fresh_wanted, opened
from services.llm.chat.streaming import closing
from services.llm.responses.render import Shape, events, output, status_of
from services.llm.responses.schemas import ResponseEvent, ResponseObject, ResponseRequest
from services.llm.responses.store import ResponseLinks
from services.llm.responses.translate import chat_request, renamed
from shared.errors import APIError
from shared.openapi import answers
from shared.web import stream_slot

router = APIRouter(tags=["responses"])


def response_links(request: Request) -> ResponseLinks:
    found: ResponseLinks = request.app.state.response_links
    return found


Links = Annotated[ResponseLinks, Depends(response_links)]


@router.post(
    "/v1/responses",
    response_model=None,
    responses=answers(
        "application/json",
        "text/event-stream",
        description="A response, or its stream of events",
        json=ResponseObject,
        events=ResponseEvent,
    ),
)
async def create_response(
    body: ResponseRequest,
    request: Request,
    caller: Chatter,
    chat: Chat,
    conversations: Conversations,
    translate: Translate,
    links: Links,
) -> Response | dict[str, Any]:
    try:
        job, tools = await translate.completion(chat_request(body, None), caller, fresh_wanted(request))
    except APIError as exc:
        exc.param = renamed(exc.param)  # chat's field, as this request calls it
        raise
    # Stored unless the request says not to; without a Redis, only when it insists (503).
    store = body.store is True or (body.store is None and conversations.available)
    if store or body.previous_response_id is not None:
        conversation = await links.conversation_for(caller.subject, body.previous_response_id)
        await conversations.check_room(conversation, job.messages)
        job.conversation = conversation
    shape = Shape(links.new_id(), body, chat.model_id, stored=store)

    async def finish(text: str, _: Done) -> None:
        """The turn and its answer stored, and the response linked to them."""
        if store and job.conversation is not None:
            # Instructions, tools and system messages are the request's own: not carried over.
            said = [m for m in job.messages if m["role"] != "system"]
            await conversations.append(job.conversation, [*said, {"role": "assistant", "content": text}])
            await links.link(caller.subject, shape.id, job.conversation)

    slot = await stream_slot(request) if body.stream else None
    session = await opened(chat, job, request, slot)
    if slot is not None:
        return closing(events(shape, session, tools.active, finish), session, slot)
    text, done = await answer_whole(session, request)
    await finish(text, done)
    return shape.response(status_of(done), output(text, tools.active), done)
