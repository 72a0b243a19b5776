"""The OpenAI-compatible front: `openai_protocol` (requests: validation, conversion to the core's
types) and `openai_responses` (responses, stream chunks, SSE, error bodies).

Both modules are pure: no Ray, gRPC, Redis, torch or network. The HTTP ingress that serves
`/v1/chat/completions`, `/v1/completions` and `/v1/models` calls them.
"""
