"""OpenAI's Responses API (``POST /v1/responses``), its stateless core: a request becomes
a chat request (translate.py) answered by the chat service; ``previous_response_id``
continues a stored conversation of the caller's (store.py); the answer and its stream
are in OpenAI's shapes (render.py)."""
