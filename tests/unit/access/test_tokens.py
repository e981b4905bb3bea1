"""The proxy-token store, the usage ledger and ``llmproxy token create|list|revoke``."""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmproxy.access.tokens import (
    TOKEN_PREFIX,
    Token,
    TokenFile,
    TokenFileError,
    TokenTerms,
    UnknownToken,
    UsageFile,
    UsageLedger,
    digest_of,
    id_for,
    lease_size,
    new_token,
)
from llmproxy.cli import main as cli
from llmproxy.cli.token import parse_expiry

NOW = 1_800_000_000.0


def store(tmp_path: Path) -> TokenFile:
    return TokenFile.in_state_dir(tmp_path / "state")


# -- the token file ----------------------------------------------------------------


def test_created_token_is_long_random_and_only_its_digest_is_stored(tmp_path: Path) -> None:
    tokens = store(tmp_path)
    secret, token = tokens.create("alpha", NOW, expires=NOW + 60, max_requests=5, rpm=10)
    assert secret.startswith(TOKEN_PREFIX)
    assert len(secret) - len(TOKEN_PREFIX) >= 43  # 256 bits, url-safe base64
    raw = tokens.path.read_text()
    assert secret not in raw and secret[len(TOKEN_PREFIX) :] not in raw
    assert token.sha256 == digest_of(secret) and token.sha256 in raw
    assert token.id == id_for(token.sha256) and token.id.startswith("tok_")
    assert tokens.read() == (token,)
    assert (token.project, token.expires, token.max_requests, token.rpm) == (
        "alpha",
        NOW + 60,
        5,
        10,
    )


def test_token_file_is_private_and_written_without_leftovers(tmp_path: Path) -> None:
    tokens = store(tmp_path)
    tokens.create("alpha", NOW)
    tokens.create("beta", NOW)
    assert stat.S_IMODE(os.stat(tokens.path).st_mode) == 0o600
    names = sorted(p.name for p in tokens.path.parent.iterdir())
    assert names == ["tokens.json", "tokens.json.lock"]


def test_every_created_token_is_different(tmp_path: Path) -> None:
    tokens = store(tmp_path)
    made = [tokens.create("p", NOW) for _ in range(20)]
    assert len({s for s, _ in made}) == 20
    assert len({t.id for _, t in made}) == 20
    assert len(tokens.read()) == 20


def test_token_repr_does_not_show_the_digest(tmp_path: Path) -> None:
    _, token = store(tmp_path).create("p", NOW)
    assert token.sha256 not in repr(token)


def test_revoke_marks_the_token_and_reports_a_second_revoke(tmp_path: Path) -> None:
    tokens = store(tmp_path)
    _, keep = tokens.create("a", NOW)
    _, gone = tokens.create("b", NOW)
    revoked, changed = tokens.revoke(gone.id, NOW + 5)
    assert changed and revoked.revoked == NOW + 5
    assert {t.id: t.revoked for t in tokens.read()} == {keep.id: None, gone.id: NOW + 5}
    again, changed = tokens.revoke(gone.id, NOW + 9)
    assert not changed and again.revoked == NOW + 5
    with pytest.raises(UnknownToken):
        tokens.revoke("tok_000000000000", NOW)


def test_stamp_changes_with_every_write(tmp_path: Path) -> None:
    tokens = store(tmp_path)
    assert tokens.stamp() is None
    _, t = tokens.create("a", NOW)
    first = tokens.stamp()
    tokens.revoke(t.id, NOW)
    assert tokens.stamp() not in (None, first)


def test_missing_file_is_no_tokens_and_a_broken_one_is_an_error(tmp_path: Path) -> None:
    tokens = store(tmp_path)
    assert tokens.read() == ()
    tokens.path.parent.mkdir(parents=True)
    for content in (b"{not json", b"[]", b'{"tokens": [{"sha256": "short", "project": "x"}]}'):
        tokens.path.write_bytes(content)
        with pytest.raises(TokenFileError):
            tokens.read()


@pytest.mark.parametrize(
    ("token", "now", "state"),
    [
        (Token("i", "d", "p", NOW), NOW + 10**9, "active"),
        (Token("i", "d", "p", NOW, expires=NOW + 10), NOW + 9.9, "active"),
        (Token("i", "d", "p", NOW, expires=NOW + 10), NOW + 10, "expired"),
        (Token("i", "d", "p", NOW, revoked=NOW + 1), NOW + 2, "revoked"),
        (Token("i", "d", "p", NOW, expires=NOW + 1, revoked=NOW), NOW + 2, "revoked"),
    ],
)
def test_token_state(token: Token, now: float, state: str) -> None:
    assert token.state(now) == state


# -- usage counts ------------------------------------------------------------------


def _token(tmp_path: Path, quota: int | None) -> Token:
    return store(tmp_path).create("p", NOW, max_requests=quota)[1]


def test_quota_reservation_is_on_disk_before_the_request_passes(tmp_path: Path) -> None:
    usage = UsageFile.in_state_dir(tmp_path)
    token = _token(tmp_path, 1000)  # leases of 10
    ledger = UsageLedger(usage)
    ledger.load()
    ledger.consume(token)
    assert usage.read() == {token.id: 10}
    for _ in range(9):
        ledger.consume(token)
    assert usage.read() == {token.id: 10}
    ledger.consume(token)
    assert usage.read() == {token.id: 20}
    assert ledger.used(token.id) == 11


def test_close_writes_exact_counts_and_a_restart_continues_from_them(tmp_path: Path) -> None:
    usage = UsageFile.in_state_dir(tmp_path)
    token = _token(tmp_path, 1000)
    ledger = UsageLedger(usage)
    ledger.load()
    for _ in range(3):
        ledger.consume(token)
    ledger.close()
    assert usage.read() == {token.id: 3}
    again = UsageLedger(usage)
    again.load()
    assert again.used(token.id) == 3


def test_counts_without_quota_are_written_by_flush(tmp_path: Path) -> None:
    usage = UsageFile.in_state_dir(tmp_path)
    token = _token(tmp_path, None)
    ledger = UsageLedger(usage)
    ledger.load()
    ledger.consume(token)
    ledger.consume(token)
    assert usage.read() == {}
    ledger.flush()
    assert usage.read() == {token.id: 2}


def test_an_unwritable_usage_file_keeps_counting_in_memory(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    token = _token(tmp_path, 2)
    ledger = UsageLedger(UsageFile(blocker / "usage.json"))
    ledger.load()
    ledger.consume(token)
    ledger.consume(token)
    assert ledger.exhausted(token)
    assert ledger.write_errors == 2


def test_lease_size_is_one_percent_of_the_quota() -> None:
    assert [lease_size(q) for q in (1, 50, 99, 100, 1000, 10**6)] == [1, 1, 1, 1, 10, 10**4]


class MemoryUsage:
    """The usage file without the disk: the property below writes thousands of times."""

    path = Path("memory")

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def read(self) -> dict[str, int]:
        return dict(self.counts)

    def write(self, used: Mapping[str, int]) -> None:
        self.counts = dict(used)


@given(
    quota=st.integers(min_value=1, max_value=400),
    runs=st.lists(
        st.tuples(st.integers(min_value=0, max_value=300), st.booleans()), min_size=1, max_size=6
    ),
)
def test_a_quota_is_never_exceeded_across_crashes_and_restarts(
    quota: int, runs: list[tuple[int, bool]]
) -> None:
    token = Token(id_for("ab" * 32), "ab" * 32, "p", NOW, max_requests=quota)
    usage = MemoryUsage()
    served = 0
    for attempts, clean_stop in runs:
        ledger = UsageLedger(usage)
        ledger.load()
        for _ in range(attempts):
            if ledger.exhausted(token):
                break
            ledger.consume(token)
            served += 1
        if clean_stop:
            ledger.close()
        # else: a crash, nothing more is written
    assert served <= quota
    # What a crash may forfeit is bounded by one lease per crash.
    crashes = sum(1 for _, clean in runs if not clean)
    wanted = sum(a for a, _ in runs)
    assert served >= min(wanted, quota - crashes * lease_size(quota))


# -- llmproxy token ------------------------------------------------------------------


def _ini(tmp_path: Path, extra: str = "") -> str:
    path = tmp_path / "llmproxy.ini"
    path.write_text(
        f"""
[server]
state_dir = {tmp_path / "state"}

[route:secure]
prefix = /secure
upstream = https://api.openai.com
auth = token
api_key = env:NOT_SET_WHERE_THE_CLI_RUNS
{extra}
"""
    )
    return str(path)


def _audit(tmp_path: Path) -> list[dict[str, object]]:
    path = tmp_path / "state" / "audit.jsonl"
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def test_cli_create_prints_the_token_once_and_audits_without_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _ini(tmp_path)
    args = ["token", "create", "--config", config, "--project", "team-a", "--expires", "30d"]
    assert cli.main([*args, "--max-requests", "500", "--rpm", "60"]) == 0
    out, err = capsys.readouterr()
    secret = out.strip()
    assert secret.startswith(TOKEN_PREFIX) and "\n" not in secret
    assert secret not in err and "shown only this once" in err
    (token,) = TokenFile.in_state_dir(tmp_path / "state").read()
    assert token.sha256 == digest_of(secret)
    assert token.expires is not None and 29.9 * 86400 < token.expires - token.created <= 30 * 86400
    (line,) = _audit(tmp_path)
    assert line["action"] == "token_created"
    assert line["token_id"] == token.id and line["project"] == "team-a"
    assert line["max_requests"] == 500 and line["rpm"] == 60
    audit_text = (tmp_path / "state" / "audit.jsonl").read_text()
    assert secret not in audit_text and token.sha256 not in audit_text


def test_a_tokens_terms_are_the_terms_it_was_created_with() -> None:
    terms: TokenTerms = {
        "expires": NOW + 60,
        "max_requests": 5,
        "rpm": 7,
        "max_usd": 1.5,
        "max_tokens": 900,
        "period": "day",
        "allowed_paths": ("/v1/chat/completions",),
        "allowed_methods": ("POST",),
    }
    _, token = new_token("team-a", NOW, **terms)
    assert token.terms() == terms
    assert new_token("team-a", NOW, **token.terms())[1].terms() == terms


def test_cli_create_audits_every_term_of_the_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _ini(tmp_path)
    args = ["token", "create", "--config", config, "--project", "p", "--max-usd", "2"]
    args += ["--period", "month", "--allow-path", "/v1/embeddings", "--allow-method", "post"]
    assert cli.main(args) == 0
    capsys.readouterr()
    (token,) = TokenFile.in_state_dir(tmp_path / "state").read()
    (line,) = _audit(tmp_path)
    terms = {k: list(v) if isinstance(v, tuple) else v for k, v in token.terms().items()}
    assert {k: line[k] for k in terms} == terms
    assert line["allowed_paths"] == ["/v1/embeddings"] and line["allowed_methods"] == ["POST"]
    assert line["max_usd"] == 2 and line["period"] == "month" and line["expires"] is None


def test_cli_list_shows_ids_projects_expiry_and_usage_never_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _ini(tmp_path)
    cli.main(["token", "create", "--config", config, "--project", "alpha", "--max-requests", "9"])
    secret = capsys.readouterr().out.strip()
    (token,) = TokenFile.in_state_dir(tmp_path / "state").read()
    UsageFile.in_state_dir(tmp_path / "state").write({token.id: 4})
    assert cli.main(["token", "list", "--config", config]) == 0
    table = capsys.readouterr().out
    assert token.id in table and "alpha" in table and "active" in table
    row = next(line for line in table.splitlines() if token.id in line).split()
    assert row[5:8] == ["4", "9", "-"]  # USED, QUOTA, RPM
    assert secret not in table and token.sha256[12:] not in table
    assert cli.main(["token", "list", "--config", config, "--json"]) == 0
    (entry,) = orjson.loads(capsys.readouterr().out)
    assert entry == {
        "id": token.id,
        "project": "alpha",
        "state": "active",
        "created": entry["created"],
        "expires": "-",
        "used": 4,
        "max_requests": 9,
        "rpm": None,
        "period": "total",
        "spent_usd": 0.0,
        "spent_tokens": 0,
        "max_usd": None,
        "max_tokens": None,
        "allowed_paths": [],
        "allowed_methods": [],
    }


def test_cli_revoke_audits_and_refuses_unknown_ids(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _ini(tmp_path)
    cli.main(["token", "create", "--config", config, "--project", "alpha"])
    (token,) = TokenFile.in_state_dir(tmp_path / "state").read()
    assert cli.main(["token", "revoke", "--config", config, token.id]) == 0
    assert "revoked" in capsys.readouterr().out
    (after,) = TokenFile.in_state_dir(tmp_path / "state").read()
    assert after.revoked is not None
    assert [a["action"] for a in _audit(tmp_path)] == ["token_created", "token_revoked"]
    assert cli.main(["token", "revoke", "--config", config, token.id]) == 0
    assert "already revoked" in capsys.readouterr().out
    assert len(_audit(tmp_path)) == 2
    assert cli.main(["token", "revoke", "--config", config, "tok_ffffffffffff"]) == 1
    assert "no token with id" in capsys.readouterr().err


def test_cli_reports_config_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _ini(tmp_path, extra="bogus = 1\n")
    assert cli.main(["token", "list", "--config", config]) == 1
    assert "route:secure.bogus: unknown key" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["-5", "0", "many"])
def test_cli_rejects_bad_quota_values(tmp_path: Path, bad: str) -> None:
    config = _ini(tmp_path)
    with pytest.raises(SystemExit):
        cli.main(["token", "create", "--config", config, "--project", "a", "--rpm", bad])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30d", NOW + 30 * 86400),
        ("12h", NOW + 12 * 3600),
        ("90m", NOW + 90 * 60),
        ("2w", NOW + 14 * 86400),
        ("3600", NOW + 3600),
        ("never", None),
        ("2030-01-01", 1893456000.0),
        ("2030-01-01T01:00:00+01:00", 1893456000.0),
    ],
)
def test_parse_expiry(text: str, expected: float | None) -> None:
    assert parse_expiry(text, NOW) == expected


@pytest.mark.parametrize("text", ["0d", "yesterday", "2020-01-01", "5y"])
def test_parse_expiry_refuses_the_past_and_nonsense(text: str) -> None:
    with pytest.raises(Exception, match="--expires"):
        parse_expiry(text, NOW)
