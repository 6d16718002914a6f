"""Pure folds: an upstream event stream (bytes) in, the one JSON answer a server would send out.

No Flask, no requests: ``sse`` frames network reads into events, ``chat``
folds chat-completion chunks, ``text`` legacy completions, ``responses`` the
Responses API's events.
"""
from .chat import ChatFold, fold_chat, fold_chat_chunks
from .responses import fold_responses_chunks
from .text import fold_text_chunks

__all__ = ["ChatFold", "fold_chat", "fold_chat_chunks", "fold_responses_chunks", "fold_text_chunks"]
