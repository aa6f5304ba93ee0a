"""Property-based tests of the server's request handling (hypothesis).

Random JSON for ``/v1/completions``, ``/v1/classify`` and ``/v1/adapters``: valid bodies with
one field replaced by a random value (wrong types, huge and non-finite numbers, unicode with
lone surrogates, deep nesting, oversize strings), unknown or missing fields, and raw bodies
(random bytes, truncated JSON, deep nesting). Every answer must be a 2xx of the right shape or a
4xx OpenAI-shaped error that names the field; never a 500, never a hang.
"""

from __future__ import annotations

import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_server import CLASSIFY_WORDS, bank, make_app  # noqa: F401 (bank: a fixture)

SETTINGS = dict(  # SOFTPROMPT_EXAMPLES=2000 for a longer hunt
    max_examples=int(os.environ.get("SOFTPROMPT_EXAMPLES", 100)),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
MAX_BODY = 1 << 17
LIMITS = dict(
    max_tokens_limit=4,
    max_prompts=4,
    max_prompt_tokens=48,
    max_queue=6,
    max_body_bytes=MAX_BODY,
    max_wait_ms=0,
)
ERROR_KEYS = {"message", "type", "param", "code"}

# ------------------------------------------------------------------------------ strategies

odd_chars = st.sampled_from(
    ["\ud800", "\udfff", "\udbff", "\x00", "\u200b", "\ufeff", "\U0001f600"]
)
texts = st.one_of(
    st.text(max_size=12),
    st.lists(st.one_of(st.characters(), odd_chars), max_size=12).map("".join),
    st.sampled_from(["", " ", "base", "gen-deep", "sent-prompt", "../..", "/etc", "gen-deep/.."]),
    st.integers(200, 40_000).map(lambda n: "word " * n),  # oversize: prompt limit or 413
)
numbers = st.one_of(
    st.integers(-5, 10),
    st.integers(),
    st.sampled_from([2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e308, -0.0, 0.5]),
)
leaves = st.one_of(st.none(), st.booleans(), numbers, texts)
json_values = st.recursive(
    leaves,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(texts, inner, max_size=4)),
    max_leaves=12,
)
deep = st.integers(1, 50_000).map(lambda d: "[" * d + "]" * d)

VALID = {
    "/v1/completions": {
        "model": "gen-deep",
        "prompt": ["hello there", "a film"],
        "max_tokens": 2,
        "temperature": 0.7,
        "top_p": 0.9,
        "stop": ["\n"],
        "seed": 3,
        "n": 2,
        "use_template": True,
        "user": "u",
    },
    "/v1/classify": {"model": "sent-prompt", "input": ["a joy", {"text": "dull"}], "user": "u"},
    "/v1/adapters": {"name": "late", "path": "gen-ptuning"},
}
OPTIONAL = {  # fields that may be left out
    "/v1/completions": set(VALID["/v1/completions"]) - {"model", "prompt"},
    "/v1/classify": {"user"},
    "/v1/adapters": set(),
}


some_texts = st.one_of(texts, st.lists(texts, max_size=5))
rows = st.one_of(texts, st.dictionaries(st.sampled_from(["text", "label", "x"]), texts, max_size=2))
PLAUSIBLE = {  # near-valid values per field, so that many answers are 2xx or specific 4xx
    "/v1/completions": {
        "model": st.sampled_from(["gen-deep", "base", "sent-prompt", "nope"]),
        "prompt": some_texts,
        "max_tokens": st.one_of(st.none(), st.integers(-1, 6)),
        "temperature": st.one_of(
            st.floats(-0.5, 2.5), st.integers(0, 3), st.sampled_from([5e-324, 1e-300])
        ),
        "top_p": st.one_of(st.floats(-0.1, 1.2), st.just(1)),
        "stop": st.one_of(st.none(), some_texts),
        "seed": st.one_of(st.none(), numbers),
        "n": st.integers(0, 5),
        "use_template": st.booleans(),
        "user": st.one_of(st.none(), texts),
    },
    "/v1/classify": {
        "model": st.sampled_from(["sent-prompt", "gen-deep", "base", "nope"]),
        "input": st.one_of(rows, st.lists(rows, max_size=5)),
        "user": st.one_of(st.none(), texts),
    },
    "/v1/adapters": {
        "name": st.one_of(st.sampled_from(["late", "sent-prompt", "base", "../x", ""]), texts),
        "path": st.one_of(
            st.sampled_from(
                ["gen-ptuning", "sent-prefix", "t5-deep", "../..", "/etc", "nope", "gen-deep/.."]
            ),
            texts,
        ),
    },
}


@st.composite
def mutated(draw):
    """(path, body, fields): a valid body with one to three fields changed, or one added or
    dropped."""
    path = draw(st.sampled_from(sorted(VALID)))
    body = dict(VALID[path])
    how = draw(st.sampled_from(["replace"] * 6 + ["add", "drop"]))
    if how == "add":
        field = draw(texts.filter(lambda k: k not in body))
        body[field] = draw(json_values)
        return path, body, [field], how
    if how == "drop":
        field = draw(st.sampled_from(sorted(body)))
        del body[field]
        return path, body, [field], how
    fields = draw(st.lists(st.sampled_from(sorted(body)), min_size=1, max_size=3, unique=True))
    for f in fields:
        body[f] = draw(st.one_of(PLAUSIBLE[path][f], json_values))
    return path, body, fields, how


# ------------------------------------------------------------------------------ checks


@pytest.fixture(scope="module")
def client(bank):  # noqa: F811
    app = make_app(
        bank,
        adapters={n: bank["dirs"][n] for n in ("gen-deep", "sent-prompt")},
        adapter_roots=[str(bank["root"])],
        **LIMITS,
    )
    with TestClient(app) as c, ThreadPoolExecutor(1) as pool:
        c.pool = pool
        yield c


def send(client, path: str, content: bytes):
    """POST with a time limit: a hang fails the test instead of stalling the suite."""
    fut = client.pool.submit(
        client.post, path, content=content, headers={"content-type": "application/json"}
    )
    return fut.result(timeout=60)


def encode(body) -> bytes:
    # ensure_ascii: lone surrogates travel as \\ud800 escapes; NaN/Infinity as Python writes them
    return json.dumps(body, ensure_ascii=True).encode()


def check_ok(client, path: str, body: dict, r) -> None:
    got = r.json()
    if path == "/v1/completions":
        assert r.status_code == 200
        prompts = [body["prompt"]] if isinstance(body["prompt"], str) else body["prompt"]
        assert got["object"] == "text_completion" and got["model"] == body["model"]
        assert len(got["choices"]) == len(prompts) * body.get("n", 1)
        for i, c in enumerate(got["choices"]):
            assert c["index"] == i and isinstance(c["text"], str)
            assert c["finish_reason"] in ("stop", "length")
        u = got["usage"]
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    elif path == "/v1/classify":
        assert r.status_code == 200
        items = body["input"] if isinstance(body["input"], list) else [body["input"]]
        assert got["object"] == "classification" and len(got["data"]) == len(items)
        for i, d in enumerate(got["data"]):
            assert d["index"] == i and d["label"] in CLASSIFY_WORDS.labels
            assert list(d["scores"]) == CLASSIFY_WORDS.labels
            assert all(math.isfinite(p) and 0 <= p <= 1 for p in d["scores"].values())
            assert abs(sum(d["scores"].values()) - 1) < 1e-5
    else:
        assert r.status_code == 201 and got["id"] == body["name"] and got["object"] == "model"
        d = client.delete(f"/v1/adapters/{body['name']}")  # leave the table as it was
        assert d.status_code == 200 and d.json()["deleted"] is True


def check_error(r) -> dict:
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == ERROR_KEYS and isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    return err


def names(err: dict, field: str) -> bool:
    """Does the error point at ``field`` (its param, or the message's ``field:`` / quote)?"""
    msg = err["message"]
    field = json.loads(json.dumps(field))  # as the server reads it: a surrogate pair is one char
    if err["param"] == field or f"'{field}'" in msg:
        return True
    shown = json.dumps(field)[1:-1]  # how a surrogate or control character shows in the message
    if shown != field and shown in msg:
        return True
    # a path in the message: "field: ...", "field.0: ...", "x.field: ..." ('""' for an empty key)
    word = re.escape(field or '""')
    return re.search(rf"(^|[\s;.]){word}[:.]", msg) is not None


@settings(**SETTINGS)
@given(case=mutated())
def test_changed_fields_are_answered_or_named(client, case):
    path, body, fields, how = case
    r = send(client, path, encode(body))
    event(f"{path} {r.status_code}")
    if r.status_code < 300:
        check_ok(client, path, body, r)
        return
    err = check_error(r)
    if r.status_code == 413:
        assert len(encode(body)) > MAX_BODY and "--max-body-bytes" in err["message"]
        return
    named = [f for f in fields if names(err, f) or (f == "n" and "n=" in err["message"])]
    assert named, (fields, err)


@settings(**SETTINGS)
@given(
    path=st.sampled_from(sorted(VALID)),
    content=st.one_of(
        st.binary(max_size=64),
        st.builds(
            lambda p, cut: encode(VALID[p])[:cut],
            st.sampled_from(sorted(VALID)),
            st.integers(0, 80),
        ),
        json_values.map(encode),
        deep.map(str.encode),
    ),
)
def test_any_body_is_a_2xx_or_a_json_4xx(client, path, content):
    r = send(client, path, content)
    event(f"{path} {r.status_code}")
    if r.status_code < 300:
        check_ok(client, path, json.loads(content), r)
    else:
        check_error(r)
