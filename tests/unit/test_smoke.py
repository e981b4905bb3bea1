import pytest_twisted
from twisted.internet import defer


@pytest_twisted.inlineCallbacks
def test_reactor_runs() -> object:
    result = yield defer.succeed(3)
    assert result == 3
