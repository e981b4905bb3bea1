"""twistd plugin: ``twistd -n llmproxy --config PATH`` (kept lazy: see llmproxy.tap)."""

from twisted.application.service import ServiceMaker

llmproxy = ServiceMaker(
    "llmproxy",
    "llmproxy.tap",
    "High-throughput reverse proxy for LLM APIs with batching event export.",
    "llmproxy",
)
