"""The semantic cache: answers to earlier requests, found again by the meaning of the question.

A request a decision opted in for is looked up after the decision chose its model and the PII
check ran: its *scope* (scope.py: the model, everything in the body but the last user message and
the stream flag, and the tenant header) must match exactly, and its last user message must be
within the threshold's cosine similarity of a stored one, on all-MiniLM-L6-v2's sentence embedding
(the classifier's own encoder pass plus one layer). A hit is answered by the sidecar (answers.py
renders the stored completion as JSON or SSE); a miss is routed as usual, and Envoy mirrors its
response to the sidecar (a second ext_proc filter in observability mode, enabled per route only
for requests that may be stored), which stores it once it finished normally.

Backends (store.py): in-process (bounded, the default) and Redis, where each sidecar keeps the
vectors of what Redis holds in its own index, fed by a Redis stream, and reads an answer from
Redis only on a hit.
"""

from extproc.cache import guards
from extproc.cache.answers import Answer, Capture, render
from extproc.cache.scope import Lookup, Refusal, prepare
from extproc.cache.semantic import CacheHit, SemanticCache
from extproc.cache.store import Index, MemoryStore

__all__ = [
    "Answer",
    "CacheHit",
    "Capture",
    "Index",
    "Lookup",
    "MemoryStore",
    "Refusal",
    "SemanticCache",
    "guards",
    "prepare",
    "render",
]
