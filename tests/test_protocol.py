"""The client -> server half of the protocol, as pure functions: no sockets."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.protocol import State
from websockets.server import ServerProtocol

from counter_sync.admission import TokenBucket
from counter_sync.counter import (
    DELTAS,
    BadMessage,
    Message,
    ack_event,
    error_event,
    parse_message,
    state_event,
    users_event,
)
from counter_sync.fanout import text_frame
from counter_sync.store import OpBatch, RoomState, apply_batch

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=10,
)


@pytest.mark.parametrize("action", ["plus", "minus", "sync"])
def test_plus_minus_and_sync_are_the_actions(action: str) -> None:
    assert parse_message(json.dumps({"action": action})) == Message(action)


def test_plus_and_minus_change_the_value_by_one_and_sync_changes_nothing() -> None:
    assert DELTAS == {"plus": 1, "minus": -1}


def test_extra_keys_beside_a_valid_action_are_ignored() -> None:
    assert parse_message('{"action": "plus", "from": "kiosk"}') == Message("plus")


@pytest.mark.parametrize(("action", "op"), [("plus", 1), ("minus", 7), ("plus", 2**53 - 1)])
def test_an_action_may_carry_its_op_number(action: str, op: int) -> None:
    assert parse_message(json.dumps({"action": action, "op": op})) == Message(action, op)


def test_sync_needs_no_op_and_ignores_one() -> None:
    assert parse_message('{"action": "sync", "op": 3}') == Message("sync")


@pytest.mark.parametrize("op", [0, -1, 2**53, 1.5, "1", True, [1], {}])
def test_an_op_is_a_whole_number_from_one_to_the_exact_integers(op: object) -> None:
    with pytest.raises(BadMessage, match='"op" must be a whole number'):
        parse_message(json.dumps({"action": "plus", "op": op}))


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("plus", "not valid JSON"),
        ("", "not valid JSON"),
        ("[" * 5000, "not valid JSON"),
        ('["plus"]', "must be a JSON object"),
        ("42", "must be a JSON object"),
        ("{}", 'missing "action"'),
        ('{"type": "plus"}', 'missing "action"'),
        ('{"action": "times"}', "unknown action"),
        ('{"action": "PLUS"}', "unknown action"),
        ('{"action": 1}', "unknown action"),
        ('{"action": ["plus"]}', "unknown action"),
        (b'{"action": "plus"}', "binary frames are not supported"),
    ],
)
def test_bad_messages_are_rejected_with_a_reason(message: str | bytes, reason: str) -> None:
    with pytest.raises(BadMessage, match=reason):
        parse_message(message)


@given(st.text(max_size=200))
def test_any_text_is_an_action_or_a_bad_message(message: str) -> None:
    try:
        parsed = parse_message(message)
    except BadMessage:
        return
    assert json.loads(message)["action"] == parsed.action
    assert parsed.action in ("plus", "minus", "sync")


@given(json_values)
def test_any_json_is_an_action_or_a_bad_message(value: object) -> None:
    message = json.dumps(value)
    try:
        parsed = parse_message(message)
    except BadMessage:
        assert not (
            isinstance(value, dict)
            and value.get("action") in ("plus", "minus", "sync")
            and value.get("op") is None
        )
        return
    assert isinstance(value, dict)
    assert parsed.action == value["action"]


@given(st.binary(max_size=100))
def test_any_binary_frame_is_a_bad_message(message: bytes) -> None:
    with pytest.raises(BadMessage):
        parse_message(message)


def test_events_are_the_documented_json() -> None:
    assert json.loads(users_event(3)) == {"type": "users", "count": 3}
    assert json.loads(state_event(RoomState(-7, 12, "e1"))) == {
        "type": "state",
        "value": -7,
        "seq": 12,
        "epoch": "e1",
    }
    assert json.loads(ack_event(9)) == {"type": "ack", "op": 9}
    assert json.loads(error_event("no", 4)) == {"type": "error", "error": "no", "op": 4}
    assert json.loads(error_event("no")) == {"type": "error", "error": "no"}


def test_a_batch_that_follows_on_counts_all_its_ops() -> None:
    assert apply_batch(4, OpBatch("s", 5, (1, 1, -1))) == (5, 7)


def test_a_retried_batch_counts_only_its_new_ops() -> None:
    assert apply_batch(6, OpBatch("s", 5, (1, 1, -1))) == (7, 7)
    assert apply_batch(9, OpBatch("s", 5, (1, 1, -1))) == (10, 9)  # all retries: none counts


def test_a_batch_that_skips_ahead_counts_nothing_and_moves_nothing() -> None:
    assert apply_batch(4, OpBatch("s", 6, (1,))) == (7, 4)


@given(st.integers(0, 50), st.integers(1, 60), st.lists(st.sampled_from((-1, 0, 1)), min_size=1))
def test_each_op_number_counts_at_most_once(last: int, first: int, deltas: list[int]) -> None:
    batch = OpBatch("s", first, tuple(deltas))
    start, after = apply_batch(last, batch)
    counted = range(start, batch.last + 1)
    assert all(op > last for op in counted)  # nothing done already counts again
    assert after >= last  # the last done op never goes back
    if first <= last + 1:
        assert after == max(last, batch.last)


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(0.4)  # 0.8 token refilled: not yet one
    assert bucket.take(0.5)  # one token after half a second at 2/s
    assert not bucket.take(0.5)


def test_token_bucket_never_saves_more_than_the_burst() -> None:
    bucket = TokenBucket(rate=10.0, burst=2, now=0.0)
    assert [bucket.take(100.0) for _ in range(3)] == [True, True, False]


def test_token_bucket_ignores_a_clock_that_goes_backwards() -> None:
    bucket = TokenBucket(rate=1.0, burst=1, now=10.0)
    assert bucket.take(10.0)
    assert not bucket.take(5.0)


@pytest.mark.parametrize(
    "message",
    [
        state_event(RoomState(0, 0, "e")),
        users_event(12),
        state_event(RoomState(-(2**53) + 1, 2**40, "0123456789abcdef")),
        "é" * 200,
    ],
)
def test_the_shared_frame_is_what_the_library_would_send_each_connection(message: str) -> None:
    protocol = ServerProtocol()
    protocol.state = State.OPEN
    protocol.send_text(message.encode())
    assert protocol.data_to_send() == [text_frame(message)]
