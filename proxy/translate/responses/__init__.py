"""The Responses bridge: ``/v1/responses`` for upstreams that only serve chat completions.

``request`` turns a Responses body into a chat body (translation.md §2.1),
``response`` a ``chat.completion`` into a Response object (§2.2, §2.3), and
``stream`` chat stream events into Responses SSE events (§2.4), fed by
``pipeline`` from the upstream's reads; ``items`` orders input items into
chat messages; ``toolmap`` remembers which upstream function names were
custom or namespaced tools.
"""
