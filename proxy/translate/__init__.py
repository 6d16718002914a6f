"""Pure protocol translators between the clients' APIs and chat completions.

``chat_stream`` and ``tools`` are shared by both bridges; ``anthropic/`` and
``responses/`` hold one request, response and stream module each. Nothing
here imports Flask, requests, the routes or the state store.
"""
