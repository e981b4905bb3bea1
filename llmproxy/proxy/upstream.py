"""Upstream connections: the pooled Agent and how it reaches hosts
(tests: tests/integration/test_proxy.py).

IP literals are dialled directly: Twisted's ``HostnameEndpoint`` resolves even
those through the thread pool and reports a refused connection only after its
0.3 s happy-eyeballs attempt delay.  Names go through ``HostnameEndpoint`` as
usual (the pool keeps connections, so resolution is rare).
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet import endpoints
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer


@implementer(IAgentEndpointFactory)
class UpstreamEndpointFactory:
    def __init__(self, reactor: Any, connect_timeout: float) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout
        self._tls = BrowserLikePolicyForHTTPS()

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        bare = host.strip("[]")
        endpoint: IStreamClientEndpoint
        try:
            ip = ipaddress.ip_address(bare)
        except ValueError:
            endpoint = endpoints.HostnameEndpoint(
                self._reactor, host, uri.port, timeout=self._timeout
            )
        else:
            cls = endpoints.TCP6ClientEndpoint if ip.version == 6 else endpoints.TCP4ClientEndpoint
            endpoint = cls(self._reactor, bare, uri.port, timeout=self._timeout)
        if uri.scheme == b"https":
            creator = self._tls.creatorForNetloc(uri.host, uri.port)
            endpoint = endpoints.wrapClientTLS(creator, endpoint)
        return endpoint


def make_agent(reactor: Any, pool: HTTPConnectionPool, connect_timeout: float) -> Agent:
    agent: Agent = Agent.usingEndpointFactory(
        reactor, UpstreamEndpointFactory(reactor, connect_timeout), pool=pool
    )
    return agent
