"""The HTTP vocabulary shared by the proxy, access control, the cache and the admin
listener: where a request goes (routes, the SSRF allowlist), which headers cross,
request ids, and the OpenAI-shaped error body.  It imports none of them."""
