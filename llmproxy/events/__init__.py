"""The event vocabulary every other package speaks: the envelope, SSE parsing, token
usage and the facts of an exchange.  It imports none of the packages that use it."""
