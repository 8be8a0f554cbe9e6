"""The wire contracts between Baton's services: one module of pydantic models per API,
imported by the server that answers and by every client that asks (as vLLM's protocol
module serves its server and its tests)."""
