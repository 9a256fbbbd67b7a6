"""Models, codec, settings, keys, backoff, reconnects, the public surface: no Redis server here.

Tests marked "was a package bug" pin defects found while writing them
and pass once the package is fixed.
"""

from __future__ import annotations

import builtins
import copy
import hashlib
import inspect
import json
import logging
import math
import re
import threading
from typing import Any

import attrs
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import semibot_queue
from semibot_queue import constants, error_text
from semibot_queue.backoff import exponential_delay
from semibot_queue.clients import make_client
from semibot_queue.codec import (
    Codec,
    describe_error,
    fields_of,
    format_traceback,
    task_id_of,
)
from semibot_queue.connection import Reconnector, mask_url
from semibot_queue.constants import MAX_NAME_LENGTH
from semibot_queue.errors import (
    DuplicateTaskError,
    InvalidTaskError,
    PermanentTaskError,
    QueueConnectionError,
    QueueError,
    QueueFullError,
    RedisCommandError,
    SettingsError,
)
from semibot_queue.keys import KeySpace, validate_name
from semibot_queue.models import DeadLetterRecord, TaskMessage, TaskPayload, TaskResult
from semibot_queue.settings import QueueSettings

# --- helpers ----------------------------------------------------------------------------------

#: Codec limit large enough that size never matters in tests about something else.
ROOMY = 10_000_000

GOOD_MESSAGE: dict[str, Any] = {
    "session_id": "session-1",
    "agent_id": "agent-1",
    "org_id": "org-1",
    "messages": [{"role": "user", "content": "hello"}],
    "config": {"model": "m", "temperature": 0.5},
    "metadata": {"source": "test"},
    "time_limit": None,
    "task_id": "task-1",
    "enqueued_at": 1_700_000_000.25,
    "retry_count": 1,
    "delivery_count": 2,
    "last_error": "ValueError: boom",
}

GOOD_RESULT: dict[str, Any] = {
    "task_id": "task-1",
    "session_id": "session-1",
    "status": "succeeded",
    "result": {"answer": 42},
    "error": None,
    "attempts": 1,
    "duration_s": 0.5,
    "finished_at": 1_700_000_001.0,
}

GOOD_RECORD: dict[str, Any] = {
    "task_id": "task-1",
    "reason": "exhausted",
    "error_type": "ValueError",
    "error": "boom",
}


def payload(**changes: Any) -> TaskPayload:
    """A valid TaskPayload, with ``changes`` applied."""
    fields = copy.deepcopy({name: GOOD_MESSAGE[name] for name in fields_of(TaskPayload)})
    return TaskPayload(**{**fields, **changes})


def message(**changes: Any) -> TaskMessage:
    """A valid TaskMessage, with ``changes`` applied."""
    return TaskMessage(**{**copy.deepcopy(GOOD_MESSAGE), **changes})


def as_json(data: Any) -> bytes:
    return json.dumps(data).encode()


def canonical(value: Any) -> str:
    """A text that tells ``1`` from ``1.0`` and ``True``, unlike ``==``."""
    return json.dumps(value, sort_keys=True, allow_nan=False)


#: Hypothesis settings for machines under load (CI, tox running four Pythons): a slow example
#: is not a failure here, a wrong one is.
timing_free = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- strategies -------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)
json_objects = st.dictionaries(st.text(), json_values, max_size=5)
chat = st.lists(st.fixed_dictionaries({"role": st.text(), "content": st.text()}), max_size=5)
finite = st.floats(allow_nan=False, allow_infinity=False)
counts = st.integers(min_value=0, max_value=2**63)
names = st.text(min_size=1)
task_ids = st.from_regex(r"[A-Za-z0-9_.:\-]{1,200}", fullmatch=True)

messages = st.builds(
    TaskMessage,
    session_id=names,
    agent_id=names,
    org_id=names,
    messages=chat,
    config=json_objects,
    metadata=json_objects,
    task_id=task_ids,
    enqueued_at=finite,
    retry_count=counts,
    delivery_count=counts,
    last_error=st.none() | st.text(),
)
results = st.builds(
    TaskResult,
    task_id=names,
    session_id=names,
    status=st.just("succeeded"),
    result=json_values,
    error=st.none() | st.text(),
    attempts=counts,
    duration_s=finite,
    finished_at=finite,
) | st.builds(
    TaskResult,
    task_id=names,
    session_id=names,
    status=st.sampled_from(["failed", "cancelled"]),
    error=st.none() | st.text(),
    attempts=counts,
    duration_s=finite,
    finished_at=finite,
)
records = st.builds(
    DeadLetterRecord,
    task_id=names,
    reason=st.sampled_from(["exhausted", "permanent", "invalid", "poison"]),
    error_type=st.text(),
    error=st.text(),
    traceback=st.none() | st.text(),
    attempts=counts,
    delivery_count=counts,
    enqueued_at=st.none() | finite,
    failed_at=finite,
    worker_id=st.none() | st.text(),
    message=st.none() | json_objects,
    raw=st.none() | st.text(),
    raw_encoding=st.none() | st.sampled_from(["utf-8", "base64"]),
)


# --- models -----------------------------------------------------------------------------------


class TestTaskPayloadValidation:
    """A TaskPayload refuses bad fields when built, naming the field that is wrong."""

    def test_a_valid_payload_gets_a_fresh_uuid4_task_id_by_default(self) -> None:
        fields = {name: GOOD_MESSAGE[name] for name in ("session_id", "agent_id", "org_id")}
        first = TaskPayload(**fields, messages=[])
        second = TaskPayload(**fields, messages=[])
        assert re.fullmatch(
            r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", first.task_id
        )
        assert first.task_id != second.task_id
        assert first.config == {}
        assert first.metadata == {}

    def test_config_and_metadata_defaults_are_not_shared_between_payloads(self) -> None:
        fields = {name: GOOD_MESSAGE[name] for name in ("session_id", "agent_id", "org_id")}
        assert (
            TaskPayload(**fields, messages=[]).config
            is not TaskPayload(**fields, messages=[]).config
        )

    @pytest.mark.parametrize("field", ["session_id", "agent_id", "org_id"])
    @pytest.mark.parametrize("value", ["", 5, None])
    def test_an_identifier_that_is_not_non_empty_text_is_refused_by_name(
        self, field: str, value: object
    ) -> None:
        with pytest.raises(InvalidTaskError, match=rf"^{field}: must be a non-empty string"):
            payload(**{field: value})

    @pytest.mark.parametrize("value", ["", 5, None, "a b", "{tag}", "*", "x" * 201])
    def test_a_task_id_unfit_for_a_key_name_is_refused_by_name(self, value: object) -> None:
        with pytest.raises(InvalidTaskError, match=r"^task_id: must be 1 to 200 of"):
            payload(task_id=value)

    def test_messages_that_are_not_a_list_are_refused(self) -> None:
        with pytest.raises(InvalidTaskError, match=r"^messages: must be a list .* got str"):
            payload(messages="hello")

    @pytest.mark.parametrize(
        "item",
        [
            "hello",
            {"role": "user"},
            {"content": "hello"},
            {"role": "user", "content": "hello", "name": "extra"},
        ],
    )
    def test_a_message_that_is_not_exactly_role_and_content_is_refused_by_index(
        self, item: object
    ) -> None:
        with pytest.raises(InvalidTaskError, match=r"^messages\[1\]: must be a mapping"):
            payload(messages=[{"role": "user", "content": "ok"}, item])

    @pytest.mark.parametrize("key", ["role", "content"])
    def test_a_message_role_or_content_that_is_not_text_is_refused_by_path(self, key: str) -> None:
        item = {"role": "user", "content": "ok", key: 7}
        with pytest.raises(
            InvalidTaskError, match=rf"^messages\[2\]\.{key}: must be a string, got int"
        ):
            payload(messages=[{"role": "a", "content": "b"}, {"role": "c", "content": "d"}, item])

    @pytest.mark.parametrize("field", ["config", "metadata"])
    @pytest.mark.parametrize("value", [[], "text", {1: "not a string key"}, None])
    def test_config_and_metadata_must_be_mappings_with_string_keys(
        self, field: str, value: object
    ) -> None:
        with pytest.raises(
            InvalidTaskError, match=rf"^{field}: must be a mapping with string keys"
        ):
            payload(**{field: value})

    def test_payloads_are_frozen(self) -> None:
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            payload().session_id = "other"  # type: ignore[misc]


class TestTaskMessageValidation:
    """A TaskMessage is a payload plus its history; its counters are whole numbers >= 0."""

    def test_from_payload_copies_every_payload_field_and_starts_a_fresh_history(self) -> None:
        source = payload()
        built = TaskMessage.from_payload(source, enqueued_at=12.5)
        assert {name: getattr(built, name) for name in fields_of(TaskPayload)} == attrs.asdict(
            source
        )
        assert (built.enqueued_at, built.retry_count, built.delivery_count, built.last_error) == (
            12.5,
            0,
            0,
            None,
        )

    @pytest.mark.parametrize("field", ["retry_count", "delivery_count"])
    @pytest.mark.parametrize("value", [-1, True, 1.5, "1"])
    def test_counters_refuse_negatives_bools_and_non_integers_by_name(
        self, field: str, value: object
    ) -> None:
        with pytest.raises(InvalidTaskError, match=rf"^{field}: must be a whole number >= 0"):
            message(**{field: value})

    def test_a_message_is_still_a_payload(self) -> None:
        assert isinstance(message(), TaskPayload)


class TestTaskResultValidation:
    """A TaskResult's status is succeeded, failed or cancelled; only a success has a value."""

    @pytest.mark.parametrize("status", ["succeeded", "failed", "cancelled"])
    def test_the_three_known_statuses_are_accepted(self, status: str) -> None:
        assert TaskResult(task_id="t", session_id="s", status=status).status == status  # type: ignore[arg-type]

    @pytest.mark.parametrize("status", ["done", "", None, "SUCCEEDED", ["failed"]])
    def test_an_unknown_status_is_refused_by_name(self, status: object) -> None:
        with pytest.raises(InvalidTaskError, match=r"^status: must be one of"):
            TaskResult(task_id="t", session_id="s", status=status)  # type: ignore[arg-type]

    @pytest.mark.parametrize("status", ["failed", "cancelled"])
    def test_a_task_that_did_not_succeed_carries_no_result_value(self, status: str) -> None:
        with pytest.raises(InvalidTaskError, match=rf"^result: a {status} task has no result"):
            TaskResult(task_id="t", session_id="s", status=status, result=0)  # type: ignore[arg-type]


class TestDecodingRefusesBadTasks:
    """Decoding turns every malformed task into InvalidTaskError naming the field path."""

    codec = Codec(ROOMY)

    def test_a_missing_session_id_is_named(self) -> None:
        data = {k: v for k, v in GOOD_MESSAGE.items() if k != "session_id"}
        with pytest.raises(
            InvalidTaskError, match=r"required field missing @ TaskMessage\.session_id"
        ):
            self.codec.decode_message(as_json(data))

    def test_a_missing_field_of_a_payload_dict_is_named(self) -> None:
        data = {"session_id": "s", "org_id": "o", "messages": []}
        with pytest.raises(
            InvalidTaskError, match=r"required field missing @ TaskPayload\.agent_id"
        ):
            self.codec.payload_from_dict(data)

    def test_every_missing_field_is_named_at_once(self) -> None:
        with pytest.raises(InvalidTaskError) as caught:
            self.codec.decode_message(b"{}")
        for field in ("session_id", "agent_id", "org_id", "messages"):
            assert f"TaskMessage.{field}" in str(caught.value)

    def test_messages_that_are_not_a_list_are_named(self) -> None:
        with pytest.raises(
            InvalidTaskError, match=r"expected a list, got str @ TaskMessage\.messages"
        ):
            self.codec.decode_message(as_json({**GOOD_MESSAGE, "messages": "hi"}))

    def test_a_message_without_role_and_content_strings_is_named_by_index(self) -> None:
        bad = {**GOOD_MESSAGE, "messages": [{"role": "user", "content": "ok"}, {"role": "user"}]}
        with pytest.raises(InvalidTaskError, match=r"messages\[1\]: must be a mapping"):
            self.codec.decode_message(as_json(bad))

    def test_a_message_content_that_is_not_text_is_named_by_path(self) -> None:
        bad = {**GOOD_MESSAGE, "messages": [{"role": "user", "content": ["not", "text"]}]}
        with pytest.raises(
            InvalidTaskError, match=r"messages\[0\]\.content: must be a string, got list"
        ):
            self.codec.decode_message(as_json(bad))

    @pytest.mark.parametrize(
        ("field", "value", "expected"),
        [
            ("retry_count", True, "expected a whole number, got bool"),
            ("delivery_count", False, "expected a whole number, got bool"),
            ("retry_count", 1.0, "expected a whole number, got float"),
            ("retry_count", "1", "expected a whole number, got str"),
            ("session_id", 5, "expected a string, got int"),
            ("task_id", 5, "expected a string, got int"),
            ("last_error", 5, "expected a string, got int"),
            ("enqueued_at", True, "expected a number, got bool"),
            ("enqueued_at", "now", "expected a number, got str"),
            ("config", [], "expected a JSON object, got list"),
            ("metadata", "none", "expected a JSON object, got str"),
        ],
    )
    def test_a_field_of_the_wrong_json_type_is_named_and_never_coerced(
        self, field: str, value: object, expected: str
    ) -> None:
        with pytest.raises(InvalidTaskError, match=rf"{expected} @ TaskMessage\.{field}$"):
            self.codec.decode_message(as_json({**GOOD_MESSAGE, field: value}))

    def test_a_negative_counter_is_named(self) -> None:
        with pytest.raises(InvalidTaskError, match=r"retry_count: must be a whole number >= 0"):
            self.codec.decode_message(as_json({**GOOD_MESSAGE, "retry_count": -1}))

    def test_an_integer_enqueued_at_is_read_as_a_float(self) -> None:
        decoded = self.codec.decode_message(as_json({**GOOD_MESSAGE, "enqueued_at": 7}))
        assert decoded.enqueued_at == 7.0
        assert isinstance(decoded.enqueued_at, float)

    def test_bytes_that_are_not_utf8_are_refused(self) -> None:
        with pytest.raises(InvalidTaskError, match=r"^payload is not UTF-8 text"):
            self.codec.decode_message(b'{"session_id": "\xff\xfe"}')

    @pytest.mark.parametrize("raw", [b"", b"not json", b"{'single': 'quotes'}", b'{"a": 1'])
    def test_bytes_that_are_not_json_are_refused(self, raw: bytes) -> None:
        with pytest.raises(InvalidTaskError, match=r"^payload is not JSON"):
            self.codec.decode_message(raw)

    @pytest.mark.parametrize(
        ("raw", "kind"),
        [(b"[1, 2]", "list"), (b'"text"', "str"), (b"3", "int"), (b"null", "NoneType")],
    )
    def test_json_that_is_not_an_object_is_refused_with_its_type(
        self, raw: bytes, kind: str
    ) -> None:
        with pytest.raises(
            InvalidTaskError, match=rf"^TaskMessage: expected a JSON object, got {kind}$"
        ):
            self.codec.decode_message(raw)

    def test_an_unknown_result_status_is_named(self) -> None:
        with pytest.raises(InvalidTaskError, match=r"maybe.*@ TaskResult\.status"):
            self.codec.decode_result(as_json({**GOOD_RESULT, "status": "maybe"}))

    def test_a_bool_result_attempt_count_is_named(self) -> None:
        with pytest.raises(InvalidTaskError, match=r"got bool @ TaskResult\.attempts"):
            self.codec.decode_result(as_json({**GOOD_RESULT, "attempts": True}))

    def test_an_unknown_raw_encoding_of_a_dead_letter_is_named(self) -> None:
        with pytest.raises(InvalidTaskError, match=r"@ DeadLetterRecord\.raw_encoding"):
            self.codec.decode_record(as_json({**GOOD_RECORD, "raw_encoding": "latin-1"}))

    def test_a_dead_letter_message_that_is_not_an_object_is_named(self) -> None:
        with pytest.raises(InvalidTaskError, match=r"got list @ DeadLetterRecord\.message"):
            self.codec.decode_record(as_json({**GOOD_RECORD, "message": []}))

    def test_a_dead_letter_may_keep_no_message(self) -> None:
        record = self.codec.decode_record(as_json({**GOOD_RECORD, "message": None}))
        assert record.message is None

    def test_a_record_from_a_dict_that_is_not_a_mapping_is_refused(self) -> None:
        with pytest.raises(
            InvalidTaskError, match=r"^TaskMessage: expected a JSON object, got list"
        ):
            self.codec.message_from_dict([])


class TestPayloadSizeLimit:
    """MAX_PAYLOAD_BYTES bounds a task both when it is written and when it is read."""

    def test_encode_accepts_exactly_the_limit_and_refuses_one_byte_more(self) -> None:
        task = message()
        size = len(Codec(ROOMY).encode_message(task))
        assert len(Codec(size).encode_message(task)) == size
        with pytest.raises(
            InvalidTaskError,
            match=rf"task task-1: encoded size {size} bytes exceeds"
            rf" MAX_PAYLOAD_BYTES \({size - 1}\)",
        ):
            Codec(size - 1).encode_message(task)

    def test_the_limit_counts_utf8_bytes_not_characters(self) -> None:
        ascii_size = len(
            Codec(ROOMY).encode_message(message(messages=[{"role": "u", "content": "e"}]))
        )
        with pytest.raises(InvalidTaskError, match="exceeds MAX_PAYLOAD_BYTES"):
            Codec(ascii_size).encode_message(message(messages=[{"role": "u", "content": "\u00e9"}]))

    def test_decode_accepts_exactly_the_limit_and_refuses_one_byte_more(self) -> None:
        raw = Codec(ROOMY).encode_message(message())
        assert Codec(len(raw)).decode_message(raw) == message()
        with pytest.raises(
            InvalidTaskError, match=rf"^payload of {len(raw)} bytes exceeds MAX_PAYLOAD_BYTES"
        ):
            Codec(len(raw) - 1).decode_message(raw)

    def test_decode_checks_the_size_before_parsing(self) -> None:
        with pytest.raises(InvalidTaskError, match="exceeds MAX_PAYLOAD_BYTES"):
            Codec(10).decode_message(b"not json but far too long")


class TestDecodeDelivery:
    """A task a worker takes counts this take, the deliveries its body records, and the
    deliveries lost or given back that Redis counts outside the body."""

    codec = Codec(ROOMY)

    def test_a_first_take_counts_one_delivery(self) -> None:
        stored = self.codec.encode_message(message(delivery_count=0))
        assert self.codec.decode_delivery(stored, 0).delivery_count == 1

    def test_a_take_adds_to_the_deliveries_already_recorded(self) -> None:
        stored = self.codec.encode_message(message(delivery_count=4))
        assert self.codec.decode_delivery(stored, 0).delivery_count == 5

    def test_deliveries_counted_outside_the_body_are_added(self) -> None:
        stored = self.codec.encode_message(message(delivery_count=1))
        delivered = self.codec.decode_delivery(stored, 2)
        assert delivered.delivery_count == 4
        assert attrs.evolve(delivered, delivery_count=1) == message(delivery_count=1)

    def test_a_task_without_a_delivery_count_starts_from_zero(self) -> None:
        data = {k: v for k, v in GOOD_MESSAGE.items() if k != "delivery_count"}
        assert self.codec.decode_delivery(as_json(data), 1).delivery_count == 2

    def test_the_size_limit_applies_to_the_body(self) -> None:
        raw = self.codec.encode_message(message())
        assert Codec(len(raw)).decode_delivery(raw, 12).task_id == "task-1"
        with pytest.raises(InvalidTaskError, match=rf"^payload of {len(raw)} bytes exceeds"):
            Codec(len(raw) - 1).decode_delivery(raw, 0)

    def test_a_delivery_count_of_the_wrong_type_is_named_not_incremented(self) -> None:
        raw = as_json({**GOOD_MESSAGE, "delivery_count": True})
        with pytest.raises(InvalidTaskError, match=r"got bool @ TaskMessage\.delivery_count"):
            self.codec.decode_delivery(raw, 1)

    # Was a package bug (issue 8): a pending body started with a "~N~" header, so a plain
    # JSON body (as the Semibot runtime pushes) and a headed one were two formats.
    def test_a_body_with_an_old_redelivery_header_is_not_a_task(self) -> None:
        with pytest.raises(InvalidTaskError, match=r"^payload is not JSON"):
            self.codec.decode_delivery(b"~2~" + self.codec.encode_message(message()), 0)

    @pytest.mark.parametrize(
        ("raw", "expected"),
        [
            (b"not json", r"^payload is not JSON"),
            (b"\xff", r"^payload is not UTF-8 text"),
            (b"[1]", r"^TaskMessage: expected a JSON object, got list"),
        ],
    )
    def test_a_delivery_that_is_not_a_task_is_refused(self, raw: bytes, expected: str) -> None:
        with pytest.raises(InvalidTaskError, match=expected):
            self.codec.decode_delivery(raw, 0)


#: A task as the Semibot runtime LPUSHes it onto ``agent:tasks``: its metadata carries
#: ``enqueued_at`` as an ISO-8601 string, it has no counters, config may be null.
RUNTIME_TASK = (
    b'{"task_id": "0b6f1c1e-3f1d-4f5e-9a7b-2f8e4d9c1a20", "session_id": "sess-42",'
    b' "agent_id": "agent-7", "org_id": "org-3",'
    b' "messages": [{"role": "system", "content": "You are helpful."},'
    b' {"role": "user", "content": "Summarise the report"}],'
    b' "config": null,'
    b' "metadata": {"enqueued_at": "2026-11-30T10:15:00.250000", "source": "api"}}'
)


class TestTheSemibotRuntimesWireFormat:
    """Tasks the Semibot runtime pushed run here; results reach its waiters as it wrote them."""

    codec = Codec(ROOMY)

    # Was a package bug (issue 8): a task LPUSHed in the runtime's format was never read
    # (the pending list had another name) and would not have decoded (enqueued_at, null).
    def test_a_task_the_runtime_pushed_decodes_as_its_first_delivery(self) -> None:
        delivered = self.codec.decode_delivery(RUNTIME_TASK, 0)
        assert delivered.task_id == "0b6f1c1e-3f1d-4f5e-9a7b-2f8e4d9c1a20"
        assert (delivered.session_id, delivered.agent_id, delivered.org_id) == (
            "sess-42",
            "agent-7",
            "org-3",
        )
        assert delivered.messages[1] == {"role": "user", "content": "Summarise the report"}
        assert delivered.config == {}
        assert delivered.metadata == {"enqueued_at": "2026-11-30T10:15:00.250000", "source": "api"}
        assert delivered.enqueued_at == 1_796_033_700.25  # naive ISO time: UTC
        assert (delivered.retry_count, delivered.delivery_count, delivered.last_error) == (
            0,
            1,
            None,
        )
        assert task_id_of(RUNTIME_TASK) == delivered.task_id

    @pytest.mark.parametrize(
        ("written", "expected"),
        [
            ("2026-11-30T10:15:00Z", 1_796_033_700.0),
            ("2026-11-30T10:15:00+01:00", 1_796_030_100.0),
            ("2026-11-30T10:15:00.5+00:00", 1_796_033_700.5),
            (1_796_033_700, 1_796_033_700.0),
            ("yesterday", 0.0),
            (None, 0.0),
            (["2026"], 0.0),
        ],
    )
    def test_enqueued_at_is_read_from_the_metadata(self, written: object, expected: float) -> None:
        data = json.loads(RUNTIME_TASK)
        data["metadata"]["enqueued_at"] = written
        assert self.codec.decode_message(as_json(data)).enqueued_at == expected

    def test_a_top_level_enqueued_at_wins_over_the_metadata(self) -> None:
        data = {**json.loads(RUNTIME_TASK), "enqueued_at": 12.5}
        assert self.codec.decode_message(as_json(data)).enqueued_at == 12.5

    def test_null_config_and_metadata_are_read_as_empty_mappings(self) -> None:
        data = {**json.loads(RUNTIME_TASK), "metadata": None}
        decoded = self.codec.decode_message(as_json(data))
        assert (decoded.config, decoded.metadata, decoded.enqueued_at) == ({}, {}, 0.0)

    def test_keys_the_runtime_may_add_are_ignored_when_a_task_is_read(self) -> None:
        data = {**json.loads(RUNTIME_TASK), "priority": 5}
        assert self.codec.decode_message(as_json(data)).task_id.startswith("0b6f")

    def test_a_retry_of_a_runtime_task_is_stored_in_our_full_form(self) -> None:
        following = attrs.evolve(self.codec.decode_delivery(RUNTIME_TASK, 0), retry_count=1)
        stored = json.loads(self.codec.encode_retry(following))
        assert list(stored) == fields_of(TaskMessage)
        assert stored["metadata"]["enqueued_at"] == "2026-11-30T10:15:00.250000"

    def test_a_succeeded_result_keeps_its_value_under_result(self) -> None:
        result = TaskResult(task_id="t", session_id="s", status="succeeded", result={"a": [1]})
        wire = json.loads(self.codec.encode_result(result))
        assert wire["result"] == {"a": [1]}
        assert self.codec.decode_result(self.codec.encode_result(result)) == result

    # Was a package bug (issue 8): a failed task's result was published with "result":
    # null, which the runtime's waiters could not tell from "no answer yet".
    @pytest.mark.parametrize("status", ["failed", "cancelled"])
    def test_a_failed_or_cancelled_result_holds_its_error_under_result(self, status: str) -> None:
        result = TaskResult(task_id="t", session_id="s", status=status, error="E: boom")  # type: ignore[arg-type]
        raw = self.codec.encode_result(result)
        assert json.loads(raw)["result"] == {"error": "E: boom"}
        assert self.codec.decode_result(raw) == result

    def test_a_failure_without_error_text_names_its_status(self) -> None:
        result = TaskResult(task_id="t", session_id="s", status="failed")
        raw = self.codec.encode_result(result)
        assert json.loads(raw)["result"] == {"error": "failed"}
        assert self.codec.decode_result(raw) == result

    def test_a_result_published_with_only_result_error_gives_its_error(self) -> None:
        wire = {"task_id": "t", "session_id": "s", "status": "failed", "result": {"error": "x"}}
        assert self.codec.decode_result(as_json(wire)).error == "x"


class Unprintable:
    """A value whose every method a careless encoder might call raises."""

    def __str__(self) -> str:
        raise RuntimeError("no str")

    def __repr__(self) -> str:
        raise RuntimeError("no repr")

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("no eq")

    __hash__ = object.__hash__


class Exiting:
    """A value whose methods raise BaseException subclasses."""

    def __str__(self) -> str:
        raise SystemExit(3)

    def __eq__(self, other: object) -> bool:
        raise KeyboardInterrupt

    __hash__ = object.__hash__


class MaliciousDict(dict[str, Any]):
    """A dict whose own iteration raises: the encoder must not call it."""

    def items(self) -> Any:
        raise SystemExit("items")

    def __iter__(self) -> Any:
        raise SystemExit("iter")


def _self_containing() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


class TestInputIsValidatedAsEncoded:
    """What is checked is what is written: a payload changed after it was built, nested
    too deep, or holding what JSON cannot carry is refused by name when it is encoded."""

    codec = Codec(ROOMY)

    # Was a package bug (issue 8): payloads were validated when built and encoded later,
    # so a list changed in between reached Redis unchecked and dead-lettered as invalid.
    @pytest.mark.parametrize(
        ("change", "expected"),
        [
            (lambda p: p.messages.append({"role": 5}), r"^messages\[1\]: must be a mapping"),
            (lambda p: p.messages[0].update(content=7), r"messages\[0\]\.content: must be a str"),
            (lambda p: p.config.update(when={1, 2}), r"^config\.when: not JSON-serialisable"),
            (lambda p: p.config.update({3: "x"}), r"^config: not JSON-serialisable \(a key of"),
            (lambda p: p.metadata.update(t=math.nan), r"^metadata\.t: not JSON-serialisable"),
            (
                lambda p: object.__setattr__(p, "session_id", ""),
                r"session_id: must be a non-empty string",
            ),
        ],
        ids=["message-added", "content-changed", "set", "int-key", "nan", "forced-field"],
    )
    def test_a_payload_changed_after_it_was_built_is_refused(
        self, change: Any, expected: str
    ) -> None:
        built = payload()  # its lists and dicts of its own
        change(built)
        with pytest.raises(InvalidTaskError, match=expected):
            self.codec.encode_new(built, 0.0)

    @staticmethod
    def nested(levels: int) -> dict[str, Any]:
        value: dict[str, Any] = {}
        for _ in range(levels):
            value = {"x": value}
        return value

    # Was a package bug (issue 8): nesting too deep raised RecursionError, not the
    # InvalidTaskError every bad input raises.
    @pytest.mark.parametrize("levels", [constants.MAX_JSON_DEPTH, 5_000, 100_000])
    def test_nesting_deeper_than_the_limit_is_invalid_not_a_recursion_error(
        self, levels: int
    ) -> None:
        with pytest.raises(InvalidTaskError, match=r"^config\.x\.x.*nested deeper than MAX_JSON"):
            self.codec.encode_new(payload(config=self.nested(levels)), 0.0)

    def test_nesting_up_to_the_limit_is_accepted(self) -> None:
        # the task object is level 1 and config level 2: config holds 62 more levels
        deepest = payload(config=self.nested(constants.MAX_JSON_DEPTH - 2))
        raw = self.codec.encode_new(deepest, 0.0)
        assert self.codec.decode_message(raw).config == deepest.config

    def test_a_container_that_contains_itself_is_invalid(self) -> None:
        loop: list[Any] = []
        loop.append(loop)
        with pytest.raises(InvalidTaskError, match="contains itself"):
            self.codec.encode_new(payload(metadata={"loop": loop}), 0.0)

    @pytest.mark.parametrize(
        "raw",
        [b"[" * 100_000, b'{"a":' * 65 + b"1" + b"}" * 65],
        ids=["beyond-the-parser", "beyond-the-limit"],
    )
    def test_a_stored_task_nested_too_deep_is_invalid(self, raw: bytes) -> None:
        with pytest.raises(InvalidTaskError, match=r"nest.* deeper than MAX_JSON_DEPTH"):
            self.codec.decode_delivery(raw, 0)

    def test_brackets_inside_strings_do_not_count_as_nesting(self) -> None:
        text = "[{" * constants.MAX_JSON_DEPTH
        raw = self.codec.encode_new(payload(config={"text": text}), 0.0)
        assert self.codec.decode_message(raw).config == {"text": text}

    @pytest.mark.parametrize(
        "raw", [b'{"x": NaN}', b'{"x": -Infinity}', b'{"x": 1e999}', b'{"x": ' + b"9" * 5000 + b"}"]
    )
    def test_a_stored_number_json_cannot_carry_is_invalid(self, raw: bytes) -> None:
        with pytest.raises(InvalidTaskError, match=r"^payload is not JSON"):
            self.codec.decode_message(raw)

    def test_subclasses_of_json_types_are_written_as_the_plain_type(self) -> None:
        class Text(str):
            def __str__(self) -> str:
                raise AssertionError("never called")

        class Count(int):
            def __int__(self) -> int:
                raise AssertionError("never called")

        class Ratio(float):
            def __float__(self) -> float:
                raise AssertionError("never called")

        built = payload(config={Text("k"): (Count(3), Ratio(1.5), Text("v"))})
        stored = json.loads(self.codec.encode_new(built, 0.0))
        assert stored["config"] == {"k": [3, 1.5, "v"]}

    def test_an_integer_too_long_for_json_text_is_refused(self) -> None:
        with pytest.raises(InvalidTaskError, match=r"^task task-1: not JSON-serialisable"):
            self.codec.encode_new(payload(config={"n": 10**5000}), 0.0)

    @pytest.mark.parametrize(
        ("changes", "says"),
        [
            ({"enqueued_at": math.nan}, r"^enqueued_at: must be a finite number"),
            ({"enqueued_at": "now"}, r"^enqueued_at: must be a finite number"),
            ({"last_error": 5}, r"^last_error: must be a string or None"),
            ({"session_id": Unprintable()}, r"^session_id: must be .*, got a Unprintable$"),
        ],
    )
    def test_message_fields_are_checked_when_built(
        self, changes: dict[str, Any], says: str
    ) -> None:
        with pytest.raises(InvalidTaskError, match=says):
            message(**changes)

    # Was a package bug (issue 8): a task id given twice in one call was pushed twice.
    # (The producer refuses it before anything is encoded; see test_producer.py.)
    def test_unknown_keys_of_a_payload_dict_are_refused_by_name(self) -> None:
        data = {**{n: GOOD_MESSAGE[n] for n in fields_of(TaskPayload)}, "sesion_id": "x"}
        with pytest.raises(InvalidTaskError, match=r"unknown key 'sesion_id' @ TaskPayload"):
            self.codec.payload_from_dict(data)

    def test_a_payload_dict_may_say_null_config_and_metadata(self) -> None:
        data = {n: GOOD_MESSAGE[n] for n in ("session_id", "agent_id", "org_id", "messages")}
        built = self.codec.payload_from_dict({**data, "config": None, "metadata": None})
        assert (built.config, built.metadata) == ({}, {})

    def test_a_payload_dict_nested_too_deep_is_refused(self) -> None:
        data = {n: GOOD_MESSAGE[n] for n in fields_of(TaskPayload)}
        with pytest.raises(InvalidTaskError, match="nested deeper than MAX_JSON_DEPTH"):
            self.codec.payload_from_dict({**data, "config": self.nested(100)})


class TestEncodingAHandlersReturnValue:
    """Whatever a handler returns, encoding its result raises InvalidTaskError or nothing."""

    codec = Codec(100_000)

    # Was a package bug (issue 8): a handler returning something odd killed the pool
    # thread that encoded its result (RecursionError, TypeError, ...).
    @pytest.mark.parametrize(
        ("value", "says"),
        [
            (_self_containing(), "contains itself"),
            ({"when": object()}, r"result\.when: a object is not a JSON value"),
            ({1, 2}, "a set is not a JSON value"),
            (b"bytes", "a bytes is not a JSON value"),
            (math.nan, "nan is not a JSON number"),
            ([math.inf], r"result\[0\]: inf is not a JSON number"),
            ("x" * 200_000, "larger than MAX_PAYLOAD_BYTES"),
            ("\u00e9" * 60_000, "exceeds MAX_PAYLOAD_BYTES"),
            ({1: "one"}, "a key of type int is not a string"),
            ({(1, 2): "pair"}, "a key of type tuple is not a string"),
            (Unprintable(), "a Unprintable is not a JSON value"),
            ([Exiting()], r"result\[0\]: a Exiting is not a JSON value"),
            ("\ud800", "not UTF-8 text"),
            ({"ok": ["\udfff"]}, r"result\.ok\[0\]: not UTF-8 text"),
            ({"\udfff": 1}, r'result\["\\udfff"\]: not UTF-8 text'),
            (["abc"] * 50_000, "larger than MAX_PAYLOAD_BYTES"),
            (10**5000, "cannot be encoded"),
        ],
        ids=[
            "recursion",
            "object",
            "set",
            "bytes",
            "nan",
            "infinity",
            "huge",
            "huge-utf8",
            "int-key",
            "tuple-key",
            "raising-methods",
            "raising-base-exceptions",
            "lone-surrogate",
            "nested-surrogate",
            "surrogate-key",
            "many-small-values",
            "int-too-long",
        ],
    )
    def test_an_odd_value_is_invalid_naming_what_was_wrong(self, value: object, says: str) -> None:
        result = TaskResult(task_id="t-9", session_id="s", status="succeeded", result=value)
        with pytest.raises(InvalidTaskError, match=rf"^result of task t-9: .*{says}"):
            self.codec.encode_result(result)

    def test_a_dict_subclass_is_read_without_calling_its_own_methods(self) -> None:
        value = MaliciousDict(a=1)
        result = TaskResult(task_id="t", session_id="s", status="succeeded", result=value)
        assert json.loads(self.codec.encode_result(result))["result"] == {"a": 1}

    def test_an_attrs_instance_is_stored_as_its_fields(self) -> None:
        result = TaskResult(task_id="t", session_id="s", status="succeeded", result=message())
        assert json.loads(self.codec.encode_result(result))["result"]["task_id"] == "task-1"

    def test_tuples_are_stored_as_lists(self) -> None:
        result = TaskResult(task_id="t", session_id="s", status="succeeded", result=(1, (2,)))
        assert json.loads(self.codec.encode_result(result))["result"] == [1, [2]]


class ExplodingMessage(Exception):  # noqa: N818 - named for what it does in the test
    """An exception whose message cannot be had."""

    def __init__(self, raises: BaseException) -> None:
        super().__init__()
        self.raises = raises

    def __str__(self) -> str:
        raise self.raises


class OddMessage(Exception):  # noqa: N818 - named for what it does in the test
    """An exception whose ``__str__`` returns ``text``, whatever that is."""

    def __init__(self, text: Any) -> None:
        super().__init__()
        self.text = text

    def __str__(self) -> Any:
        return self.text


class TestDescribingAnError:
    """describe_error and format_traceback never raise and always give storable text."""

    def test_the_message_of_an_ordinary_exception(self) -> None:
        assert describe_error(ValueError("boom")) == "boom"
        assert describe_error(KeyboardInterrupt()) == ""

    @pytest.mark.parametrize(
        "raises", [RuntimeError("x"), SystemExit(1), KeyboardInterrupt(), RecursionError()]
    )
    def test_a_str_that_raises_is_described_not_raised(self, raises: BaseException) -> None:
        text = describe_error(ExplodingMessage(raises))
        assert text == f"<str() of the exception raised {type(raises).__name__}>"

    def test_a_str_that_returns_no_string_is_described(self) -> None:
        assert describe_error(OddMessage(5)) == "<str() of the exception raised TypeError>"

    def test_a_str_subclass_message_becomes_plain_text(self) -> None:
        class Loud(str):
            def __format__(self, spec: str) -> str:
                raise RuntimeError("format")

        text = describe_error(OddMessage(Loud("quiet")))
        assert (text, type(text)) == ("quiet", str)

    def test_lone_surrogates_are_escaped_so_the_text_encodes(self) -> None:
        text = describe_error(OddMessage("bad \ud800 text"))
        assert text == "bad \\ud800 text"
        text.encode("utf-8")

    def test_a_huge_message_is_cut_to_the_limit_saying_so(self) -> None:
        text = describe_error(OddMessage("x" * 10_000_000 + "\udfff" * 10))
        assert len(text) <= constants.MAX_ERROR_CHARS
        assert text.startswith("xxx")
        assert "characters cut" in text
        text.encode("utf-8")

    def test_a_traceback_names_the_frames_and_the_message(self) -> None:
        try:
            raise ValueError("deep down")
        except ValueError as exc:
            text = format_traceback(exc)
        assert "test_a_traceback_names_the_frames_and_the_message" in text
        assert text.rstrip().endswith("ValueError: deep down")

    @pytest.mark.parametrize(
        "exc",
        [
            ExplodingMessage(SystemExit(2)),
            ExplodingMessage(RuntimeError("x")),
            OddMessage(["not", "text"]),
            OddMessage("\ud800" * 5),
        ],
        ids=["base-exception", "exception", "not-a-string", "surrogates"],
    )
    def test_a_traceback_of_an_exception_with_a_bad_message_is_still_text(
        self, exc: BaseException
    ) -> None:
        try:
            raise exc
        except BaseException as caught:  # noqa: BLE001 - the point of the test
            text = format_traceback(caught)
        assert type(exc).__name__ in text
        text.encode("utf-8")

    def test_a_traceback_that_cannot_be_formatted_falls_back_to_the_message(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # A __notes__ property that raises broke formatting up to Python 3.12 (3.13 copes
        # with it); the formatter failing is injected here so that every Python takes
        # the fallback
        def broken(*args: object, **kwargs: object) -> list[str]:
            raise RuntimeError("formatting")

        monkeypatch.setattr(error_text.traceback, "format_exception", broken)
        text = format_traceback(ValueError("still said"))
        assert text.startswith("still said\n(no traceback: formatting it raised RuntimeError)")

    def test_a_huge_traceback_keeps_its_start_and_its_end(self) -> None:
        try:
            raise OddMessage("y" * 1_000_000 + "END")
        except OddMessage as exc:
            text = format_traceback(exc)
        assert len(text) <= constants.MAX_ERROR_CHARS
        assert text.startswith("Traceback")
        assert text.rstrip().endswith("END")


class TestEncodeRetry:
    """A retry copy always fits where its task fitted: its last error is shortened."""

    def test_a_copy_that_fits_is_stored_whole(self) -> None:
        codec = Codec(ROOMY)
        following = message(last_error="E: boom")
        assert codec.encode_retry(following) == codec.encode_message(following)

    # Was a package bug (issue 8): a failure of a task near MAX_PAYLOAD_BYTES made a retry
    # copy over the limit, and the refusal killed the pool thread.
    def test_a_long_last_error_is_shortened_to_fit(self) -> None:
        bare = Codec(ROOMY).encode_message(message(last_error=None))
        codec = Codec(len(bare) + 100)
        stored = codec.encode_retry(message(last_error="E: " + "x" * 5_000))
        assert len(stored) <= len(bare) + 100
        last_error = json.loads(stored)["last_error"]
        assert last_error.startswith("E: xxx")
        assert last_error.endswith(" [...]")

    def test_when_no_error_text_fits_the_copy_keeps_none(self) -> None:
        bare = Codec(ROOMY).encode_message(message(last_error=None))
        stored = Codec(len(bare)).encode_retry(message(last_error="\u00e9" * 50))
        assert stored == bare

    def test_a_task_that_is_itself_too_large_is_still_refused(self) -> None:
        with pytest.raises(InvalidTaskError, match="exceeds MAX_PAYLOAD_BYTES"):
            Codec(50).encode_retry(message(last_error=None))
        with pytest.raises(InvalidTaskError, match="exceeds MAX_PAYLOAD_BYTES"):
            Codec(50).encode_retry(message(last_error="E"))


class TestEncodingRefusesWhatIsNotJson:
    """Only JSON crosses Redis: a task or result that cannot be JSON is refused at encode time."""

    codec = Codec(ROOMY)

    @pytest.mark.parametrize("field", ["config", "metadata"])
    def test_a_config_or_metadata_value_that_is_not_json_is_named(self, field: str) -> None:
        with pytest.raises(InvalidTaskError, match=rf"^{field}\.when: not JSON-serialisable"):
            self.codec.encode_message(message(**{field: {"when": object()}}))

    def test_message_text_that_cannot_be_utf8_is_named(self) -> None:
        with pytest.raises(
            InvalidTaskError, match=r"^messages\[0\]\.content: not JSON-serialisable"
        ):
            self.codec.encode_message(message(messages=[{"role": "user", "content": "\ud800"}]))

    def test_an_identifier_that_cannot_be_utf8_is_refused(self) -> None:
        with pytest.raises(InvalidTaskError, match=r"^session_id: not JSON-serialisable"):
            self.codec.encode_message(message(session_id="\udfff"))

    def test_a_result_value_that_is_not_json_is_refused_naming_the_task(self) -> None:
        result = TaskResult(task_id="t-9", session_id="s", status="succeeded", result={1, 2})
        with pytest.raises(InvalidTaskError, match=r"^result of task t-9:"):
            self.codec.encode_result(result)

    # Was a package bug: codec._dumps calls json.dumps without allow_nan=False, so NaN and
    # Infinity are written as the bare words NaN/Infinity, which are not JSON (RFC 8259) and
    # which other JSON readers refuse. Expected: InvalidTaskError naming the field.
    @pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
    def test_a_config_float_that_json_cannot_carry_is_refused(self, value: float) -> None:
        with pytest.raises(InvalidTaskError, match=r"^config\.temperature: not JSON-serialisable"):
            self.codec.encode_message(message(config={"temperature": value}))

    def test_a_dead_letter_keeping_what_json_cannot_carry_is_invalid(self) -> None:
        record = DeadLetterRecord(
            task_id="t", reason="invalid", error_type="E", error="e", message={"x": object()}
        )
        with pytest.raises(InvalidTaskError, match=r"^dead letter of task t: message\.x: a object"):
            self.codec.encode_record(record)

    def test_a_dead_letter_with_text_utf8_cannot_carry_is_still_stored(self) -> None:
        record = DeadLetterRecord(task_id="t", reason="invalid", error_type="E", error="\ud800")
        assert self.codec.decode_record(self.codec.encode_record(record)) == record


class TestCodecRoundTrips:
    """Every model survives encode then decode unchanged, whatever JSON it carries."""

    codec = Codec(ROOMY)

    @timing_free
    @given(messages)
    def test_a_task_message_round_trips_losslessly(self, original: TaskMessage) -> None:
        raw = self.codec.encode_message(original)
        decoded = self.codec.decode_message(raw)
        assert decoded == original
        assert canonical(self.codec.unstructure(decoded)) == canonical(
            self.codec.unstructure(original)
        )
        assert self.codec.encode_message(decoded) == raw

    @timing_free
    @given(messages)
    def test_a_new_task_encodes_as_its_never_delivered_message(self, original: TaskMessage) -> None:
        fields = {name: getattr(original, name) for name in attrs.fields_dict(TaskPayload)}
        payload = TaskPayload(**fields)
        expected = TaskMessage.from_payload(payload, original.enqueued_at)
        assert self.codec.encode_new(payload, original.enqueued_at) == (
            self.codec.encode_message(expected)
        )

    @timing_free
    @given(messages)
    def test_encoded_tasks_are_compact_utf8_json_objects(self, original: TaskMessage) -> None:
        raw = self.codec.encode_message(original)
        data = json.loads(raw.decode("utf-8"))
        assert list(data) == fields_of(TaskMessage)
        assert data["task_id"] == original.task_id

    @timing_free
    @given(results)
    def test_a_task_result_round_trips_losslessly(self, original: TaskResult) -> None:
        decoded = self.codec.decode_result(self.codec.encode_result(original))
        assert decoded == original
        assert canonical(decoded.result) == canonical(original.result)

    @timing_free
    @given(records)
    def test_a_dead_letter_record_round_trips_losslessly(self, original: DeadLetterRecord) -> None:
        decoded = self.codec.decode_record(self.codec.encode_record(original))
        assert decoded == original
        assert canonical(decoded.message) == canonical(original.message)

    def test_a_payload_dict_becomes_a_payload(self) -> None:
        data = {name: GOOD_MESSAGE[name] for name in fields_of(TaskPayload)}
        assert self.codec.payload_from_dict(data) == payload()

    def test_a_dead_letters_kept_message_becomes_a_task_message(self) -> None:
        assert self.codec.message_from_dict(dict(GOOD_MESSAGE)) == message()

    def test_unicode_survives_without_escapes(self) -> None:
        text = "h\u00e9llo \u4e16\u754c \U0001f600"
        raw = self.codec.encode_message(message(messages=[{"role": "user", "content": text}]))
        assert text.encode("utf-8") in raw
        assert self.codec.decode_message(raw).messages[0]["content"] == text

    def test_fields_of_lists_a_models_fields_in_order(self) -> None:
        assert fields_of(TaskResult) == [
            "task_id",
            "session_id",
            "status",
            "result",
            "error",
            "attempts",
            "duration_s",
            "finished_at",
        ]


class TestTaskIdOf:
    """``task_id_of`` finds a stored task's id as the Lua scripts do, or names the body."""

    @pytest.mark.parametrize(
        ("body", "expected"),
        [
            (b'{"task_id": "abc"}', "abc"),
            (b'{"task_id":"a:b.c-d_e"}', "a:b.c-d_e"),
            (b'{"session_id": "s", "task_id" :\n "late"}', "late"),
            (b'{"config": {"task_id": 5}, "task_id": "top"}', "top"),
            (b'{"task_id": "' + b"x" * 200 + b'"}', "x" * 200),
            (b'not json but "task_id": "found"', "found"),
        ],
    )
    def test_the_first_readable_task_id_is_found(self, body: bytes, expected: str) -> None:
        assert task_id_of(body) == expected

    def test_our_encoding_puts_the_task_id_first(self) -> None:
        raw = Codec(ROOMY).encode_message(message(config={"task_id": "nested"}))
        assert raw.startswith(b'{"task_id":"task-1",')
        assert task_id_of(raw) == "task-1"

    @pytest.mark.parametrize(
        "body",
        [
            b"not json",
            b"\xff\xfe",
            b"[1, 2]",
            b'{"task_id": 5}',
            b'{"id": "x"}',
            b"",
            b'{"task_id": "has space"}',
            b'{"task_id": "' + b"x" * 201 + b'"}',
            b'~2~{"task_ids": "x"}',
        ],
    )
    def test_a_body_without_a_readable_task_id_is_named_by_its_sha1(self, body: bytes) -> None:
        assert task_id_of(body) == "raw-" + hashlib.sha1(body, usedforsecurity=False).hexdigest()


# --- settings ---------------------------------------------------------------------------------

#: The constants DESIGN.md section 4 requires, every one of them.
DESIGN_CONSTANTS = [
    "DEFAULT_QUEUE_NAME",
    "RESULT_CHANNEL_PREFIX",
    "DEAD_LETTER_QUEUE",
    "MAX_CONCURRENT_TASKS",
    "QUEUE_POLL_TIMEOUT",
    "RESULT_WAIT_TIMEOUT",
    "ERROR_RETRY_DELAY",
    "MAX_RECONNECT_DELAY",
    "MAX_RECONNECT_ATTEMPTS",
    "PUBSUB_MESSAGE_TIMEOUT",
    "MAX_QUEUE_LENGTH",
    "QUEUE_LENGTH_WARNING_THRESHOLD",
    "MAX_RETRY_ATTEMPTS",
    "RETRY_BASE_DELAY",
    "RETRY_MAX_DELAY",
    "MAX_DELIVERY_ATTEMPTS",
    "DEAD_LETTER_MAX_LENGTH",
    "DEAD_LETTER_TTL",
    "RESULT_TTL",
    "HEARTBEAT_INTERVAL",
    "WORKER_DEAD_AFTER",
    "SHUTDOWN_TIMEOUT",
    "MAX_PAYLOAD_BYTES",
]


class TestConstants:
    """Every default lives in constants.py, with the Semibot runtime's values."""

    @pytest.mark.parametrize("name", DESIGN_CONSTANTS)
    def test_every_design_constant_exists(self, name: str) -> None:
        assert hasattr(constants, name)

    def test_the_semibot_defaults_are_kept(self) -> None:
        assert constants.DEFAULT_QUEUE_NAME == "agent:tasks"
        assert constants.RESULT_CHANNEL_PREFIX == "agent:results"
        assert constants.MAX_CONCURRENT_TASKS == 10
        assert constants.QUEUE_POLL_TIMEOUT == 30
        assert constants.RESULT_WAIT_TIMEOUT == 300
        assert constants.PUBSUB_MESSAGE_TIMEOUT == 1.0
        assert constants.ERROR_RETRY_DELAY == 1
        assert constants.MAX_RECONNECT_DELAY == 60
        assert constants.MAX_RETRY_ATTEMPTS == 3
        assert constants.MAX_QUEUE_LENGTH == 10_000
        assert constants.QUEUE_LENGTH_WARNING_THRESHOLD == 5_000

    def test_dead_letters_of_the_default_queue_live_at_agent_tasks_dead(self) -> None:
        assert KeySpace(constants.DEFAULT_QUEUE_NAME).dead == "{agent:tasks}:dead"

    def test_the_default_result_channel_is_agent_results_session(self) -> None:
        assert KeySpace(constants.DEFAULT_QUEUE_NAME).result_channel("s-1") == "agent:results:s-1"

    def test_every_constant_is_documented_with_a_comment(self) -> None:
        source = inspect.getsource(constants)
        for name in (n for n in vars(constants) if n.isupper()):
            assert re.search(rf"^#: .+\n{name} = ", source, re.MULTILINE), name


#: (low, high): settings of which the first must never exceed the second.
BOUNDED_PAIRS = [
    ("queue_length_warning_threshold", "max_queue_length"),
    ("error_retry_delay", "max_reconnect_delay"),
    ("retry_base_delay", "retry_max_delay"),
    ("heartbeat_interval", "worker_dead_after"),
    ("stop_poll_slice", "socket_timeout"),
    ("pubsub_message_timeout", "socket_timeout"),
]


class TestQueueSettings:
    """QueueSettings holds every tunable, frozen and validated, defaults from constants."""

    def test_every_field_defaults_to_the_constant_of_the_same_name(self) -> None:
        settings = QueueSettings()
        for field in attrs.fields(QueueSettings):
            assert getattr(settings, field.name) == getattr(constants, field.name.upper()), (
                field.name
            )

    # Was a package bug: DESIGN section 4 says QueueSettings "holds them all", but it has
    # no dead_letter_queue field, so SEMIBOT_QUEUE_DEAD_LETTER_QUEUE cannot override it.
    @pytest.mark.parametrize("name", DESIGN_CONSTANTS)
    def test_every_design_constant_is_a_setting(self, name: str) -> None:
        assert getattr(QueueSettings(), name.lower()) == getattr(constants, name)

    def test_settings_are_frozen(self) -> None:
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            QueueSettings().max_queue_length = 1  # type: ignore[misc]

    def test_settings_are_keyword_only(self) -> None:
        with pytest.raises(TypeError):
            QueueSettings("agent:tasks")  # type: ignore[misc]

    @pytest.mark.parametrize(
        ("field", "value", "expected"),
        [
            ("max_queue_length", 0, "must be positive"),
            ("max_queue_length", -5, "must be positive"),
            ("max_queue_length", True, "must be a whole number"),
            ("max_queue_length", "10", "must be a whole number"),
            ("max_retry_attempts", -1, "must be zero or more"),
            ("shutdown_timeout", False, "must be a finite number"),
            ("retry_jitter", 1.0, r"must be in \[0, 1\)"),
            ("retry_jitter", -0.1, r"must be in \[0, 1\)"),
            ("retry_jitter", True, "must be a finite number"),
            ("default_queue_name", "", "must be a non-empty string"),
            ("result_channel_prefix", 5, "must be a non-empty string"),
        ],
    )
    def test_a_bad_value_is_refused_naming_the_setting(
        self, field: str, value: object, expected: str
    ) -> None:
        with pytest.raises(SettingsError, match=rf"^setting {field} {expected}"):
            QueueSettings(**{field: value})

    def test_zero_retries_and_zero_shutdown_wait_are_allowed(self) -> None:
        settings = QueueSettings(max_retry_attempts=0, shutdown_timeout=0, retry_jitter=0.0)
        assert (settings.max_retry_attempts, settings.shutdown_timeout) == (0, 0)

    # Was a package bug: settings._positive and _non_negative test `value <= 0` and
    # `value < 0`, which are False for NaN, so NaN passes as a positive number.
    @pytest.mark.parametrize(
        "field", ["queue_poll_timeout", "max_reconnect_delay", "retry_base_delay"]
    )
    def test_nan_is_not_a_number_of_seconds(self, field: str) -> None:
        with pytest.raises(SettingsError, match=rf"setting {field}"):
            QueueSettings(**{field: math.nan})

    # Was a package bug: integer settings accept floats (_positive allows any number), so
    # QueueSettings(max_concurrent_tasks=2.5) is accepted and fails later in the thread pool.
    @pytest.mark.parametrize(
        "field", ["max_concurrent_tasks", "maintenance_batch", "max_reconnect_attempts"]
    )
    def test_a_count_must_be_a_whole_number(self, field: str) -> None:
        with pytest.raises(SettingsError, match=rf"setting {field}"):
            QueueSettings(**{field: 2.5})

    @pytest.mark.parametrize(
        ("low", "high", "values"),
        [
            ("queue_length_warning_threshold", "max_queue_length", (10_001, 10_000)),
            ("error_retry_delay", "max_reconnect_delay", (61.0, 60.0)),
            ("retry_base_delay", "retry_max_delay", (301.0, 300.0)),
            ("stop_poll_slice", "socket_timeout", (6.0, 5.0)),
            ("pubsub_message_timeout", "socket_timeout", (6.0, 5.0)),
        ],
    )
    def test_two_given_values_that_contradict_are_refused_naming_both(
        self, low: str, high: str, values: tuple[float, float]
    ) -> None:
        with pytest.raises(
            SettingsError, match=rf"^setting {low} \(.*\) must not exceed {high} \("
        ):
            QueueSettings(**{low: values[0], high: values[1]})

    def test_a_bound_may_be_reached_exactly(self) -> None:
        settings = QueueSettings(max_queue_length=10, queue_length_warning_threshold=10)
        assert settings.queue_length_warning_threshold == settings.max_queue_length

    def test_a_worker_must_miss_two_heartbeats_before_it_is_dead(self) -> None:
        with pytest.raises(
            SettingsError,
            match=r"worker_dead_after \(10.0\) must be at least 2 times heartbeat_interval \(6.0\)",
        ):
            QueueSettings(heartbeat_interval=6.0, worker_dead_after=10.0)
        assert QueueSettings(heartbeat_interval=5.0, worker_dead_after=10.0).worker_dead_after == 10

    # Was a package bug (issue 8): QueueSettings(max_queue_length=100) was refused because
    # the warning threshold's default (5,000) exceeded it; every setting must work alone.
    @pytest.mark.parametrize("field", [f.name for f in attrs.fields(QueueSettings)])
    @pytest.mark.parametrize("scale", [0.01, 100.0], ids=["far-below", "far-above"])
    def test_every_setting_can_be_given_on_its_own(self, field: str, scale: float) -> None:
        default = getattr(constants, field.upper())
        if isinstance(default, str):
            value: Any = default + ".other"
        elif field == "retry_jitter":
            value = 0.5 if scale > 1 else 0.001
        elif isinstance(default, int):
            value = max(1, round(default * scale)) if default else round(scale)
        else:
            value = default * scale if default else scale
        settings = QueueSettings(**{field: value})
        assert getattr(settings, field) == value
        for low, high in BOUNDED_PAIRS:
            assert getattr(settings, low) <= getattr(settings, high), (low, high)
        assert settings.worker_dead_after >= 2 * settings.heartbeat_interval

    @pytest.mark.parametrize(
        ("given", "follower", "expected"),
        [
            ({"max_queue_length": 100}, "queue_length_warning_threshold", 50),
            ({"max_queue_length": 1}, "queue_length_warning_threshold", 1),
            ({"max_queue_length": 20_000}, "queue_length_warning_threshold", 5_000),
            ({"queue_length_warning_threshold": 20_000}, "max_queue_length", 40_000),
            ({"max_reconnect_delay": 0.5}, "error_retry_delay", 0.5),
            ({"error_retry_delay": 120.0}, "max_reconnect_delay", 120.0),
            ({"retry_max_delay": 0.0}, "retry_base_delay", 0.0),
            ({"retry_base_delay": 600.0}, "retry_max_delay", 600.0),
            ({"worker_dead_after": 3.0}, "heartbeat_interval", 0.6),
            ({"heartbeat_interval": 6.0}, "worker_dead_after", 30.0),
            ({"socket_timeout": 0.5}, "stop_poll_slice", 0.1),
            ({"socket_timeout": 0.5}, "pubsub_message_timeout", 0.1),
            ({"stop_poll_slice": 6.0}, "socket_timeout", 30.0),
            ({"stop_poll_slice": 6.0, "pubsub_message_timeout": 7.0}, "socket_timeout", 35.0),
        ],
    )
    def test_a_dependent_default_follows_the_setting_it_depends_on(
        self, given: dict[str, Any], follower: str, expected: float
    ) -> None:
        assert getattr(QueueSettings(**given), follower) == pytest.approx(expected)

    def test_a_dependent_default_that_fits_is_kept(self) -> None:
        settings = QueueSettings(max_queue_length=50_000, worker_dead_after=60.0)
        assert settings.queue_length_warning_threshold == constants.QUEUE_LENGTH_WARNING_THRESHOLD
        assert settings.heartbeat_interval == constants.HEARTBEAT_INTERVAL

    def test_a_followed_whole_number_stays_a_whole_number(self) -> None:
        threshold = QueueSettings(max_queue_length=7).queue_length_warning_threshold
        assert (threshold, type(threshold)) == (3, int)

    @pytest.mark.parametrize("field", ["default_queue_name", "dead_letter_queue"])
    @pytest.mark.parametrize("value", ["has space", "{tag}", "x" * (MAX_NAME_LENGTH + 1)])
    def test_a_name_unfit_for_a_key_is_refused_naming_the_setting(
        self, field: str, value: str
    ) -> None:
        with pytest.raises(SettingsError, match=rf"^setting {field} .* is not allowed"):
            QueueSettings(**{field: value})

    @pytest.mark.parametrize(("poll", "expected"), [(30.0, 1.0), (0.25, 0.25)])
    def test_a_blocking_pop_waits_no_longer_than_the_stop_slice(
        self, poll: float, expected: float
    ) -> None:
        assert QueueSettings(queue_poll_timeout=poll).blocking_timeout == expected


class TestQueueSettingsFromEnv:
    """``from_env`` reads SEMIBOT_QUEUE_<NAME> overrides and names the variable it refuses."""

    def test_with_no_variables_it_gives_the_defaults(self) -> None:
        assert QueueSettings.from_env({}) == QueueSettings()

    def test_variables_override_with_the_fields_type(self) -> None:
        settings = QueueSettings.from_env(
            {
                "SEMIBOT_QUEUE_MAX_QUEUE_LENGTH": "200",
                "SEMIBOT_QUEUE_QUEUE_LENGTH_WARNING_THRESHOLD": "150",
                "SEMIBOT_QUEUE_QUEUE_POLL_TIMEOUT": "2.5",
                "SEMIBOT_QUEUE_DEFAULT_QUEUE_NAME": "other:tasks",
                "SEMIBOT_QUEUE_RETRY_JITTER": "0",
            }
        )
        assert settings.max_queue_length == 200
        assert isinstance(settings.max_queue_length, int)
        assert settings.queue_length_warning_threshold == 150
        assert settings.queue_poll_timeout == 2.5
        assert settings.default_queue_name == "other:tasks"
        assert settings.retry_jitter == 0.0
        assert isinstance(settings.retry_jitter, float)

    def test_a_float_setting_accepts_a_whole_number(self) -> None:
        assert (
            QueueSettings.from_env({"SEMIBOT_QUEUE_RESULT_WAIT_TIMEOUT": "60"}).result_wait_timeout
            == 60.0
        )

    def test_unrelated_variables_are_ignored(self) -> None:
        environ = {
            "MAX_QUEUE_LENGTH": "1",
            "SEMIBOT_QUEUE_NOT_A_SETTING": "x",
            "semibot_queue_max_queue_length": "1",
        }
        assert QueueSettings.from_env(environ) == QueueSettings()

    def test_keyword_overrides_win_over_variables(self) -> None:
        settings = QueueSettings.from_env(
            {"SEMIBOT_QUEUE_MAX_CONCURRENT_TASKS": "4"}, max_concurrent_tasks=7
        )
        assert settings.max_concurrent_tasks == 7

    def test_it_reads_the_process_environment_by_default(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("SEMIBOT_QUEUE_MAX_CONCURRENT_TASKS", "3")
        assert QueueSettings.from_env().max_concurrent_tasks == 3

    @pytest.mark.parametrize(
        ("variable", "raw"),
        [
            ("SEMIBOT_QUEUE_MAX_QUEUE_LENGTH", "abc"),
            ("SEMIBOT_QUEUE_MAX_QUEUE_LENGTH", "1.5"),
            ("SEMIBOT_QUEUE_MAX_QUEUE_LENGTH", ""),
            ("SEMIBOT_QUEUE_MAX_QUEUE_LENGTH", "0"),
            ("SEMIBOT_QUEUE_QUEUE_POLL_TIMEOUT", "soon"),
            ("SEMIBOT_QUEUE_QUEUE_POLL_TIMEOUT", "-1"),
            ("SEMIBOT_QUEUE_RETRY_JITTER", "1"),
            ("SEMIBOT_QUEUE_DEFAULT_QUEUE_NAME", ""),
        ],
    )
    def test_a_bad_value_is_refused_naming_the_variable_and_value(
        self, variable: str, raw: str
    ) -> None:
        with pytest.raises(SettingsError, match=rf"^environment variable {variable}={raw!r}: "):
            QueueSettings.from_env({variable: raw})

    def test_a_cross_field_conflict_from_the_environment_names_both_settings(self) -> None:
        with pytest.raises(
            SettingsError, match=r"queue_length_warning_threshold .* max_queue_length"
        ):
            QueueSettings.from_env(
                {
                    "SEMIBOT_QUEUE_MAX_QUEUE_LENGTH": "100",
                    "SEMIBOT_QUEUE_QUEUE_LENGTH_WARNING_THRESHOLD": "200",
                }
            )

    def test_one_variable_alone_moves_what_depends_on_it(self) -> None:
        settings = QueueSettings.from_env({"SEMIBOT_QUEUE_MAX_QUEUE_LENGTH": "100"})
        assert (settings.max_queue_length, settings.queue_length_warning_threshold) == (100, 50)

    # Was a package bug (issue 8): a bad queue name from the environment was refused
    # later, by the key space, without naming the variable it came from.
    @pytest.mark.parametrize("raw", ["bad name", "{agent}:tasks", "caf\u00e9"])
    def test_a_bad_queue_name_from_the_environment_names_the_variable(self, raw: str) -> None:
        variable = "SEMIBOT_QUEUE_DEFAULT_QUEUE_NAME"
        with pytest.raises(
            SettingsError, match=rf"^environment variable {variable}={re.escape(repr(raw))}: "
        ):
            QueueSettings.from_env({variable: raw})


# --- keys -------------------------------------------------------------------------------------


class TestKeySpace:
    """Every key of a queue carries its ``{queue}`` hash tag; unsafe names are refused."""

    @pytest.mark.parametrize(
        "key",
        [
            lambda k: k.scheduled,
            lambda k: k.workers,
            lambda k: k.dead,
            lambda k: k.dead_index,
            lambda k: k.inflight_prefix,
            lambda k: k.inflight("worker-1"),
            lambda k: k.result_key_prefix,
            lambda k: k.result("task-1"),
        ],
        ids=[
            "scheduled",
            "workers",
            "dead",
            "dead_index",
            "inflight_prefix",
            "inflight",
            "result_key_prefix",
            "result",
        ],
    )
    @pytest.mark.parametrize("queue", ["q", "agent:tasks", "a.b-c_d"])
    def test_every_key_starts_with_the_queue_hash_tag(self, key: Any, queue: str) -> None:
        name = key(KeySpace(queue))
        assert name.startswith("{" + queue + "}:")
        assert name.count("{") == 1

    # Was a package bug (issue 8): tasks the Semibot runtime LPUSHed onto agent:tasks were
    # never read: our pending list was {agent:tasks}:pending.
    @pytest.mark.parametrize("queue", ["q", "agent:tasks"])
    def test_the_pending_list_is_named_exactly_as_the_queue(self, queue: str) -> None:
        assert KeySpace(queue).pending == queue

    def test_the_keys_of_one_queue_are_all_different(self) -> None:
        k = KeySpace("q")
        names = [
            k.pending,
            k.scheduled,
            k.workers,
            k.dead,
            k.dead_index,
            k.inflight("w"),
            k.result("t"),
        ]
        assert len(set(names)) == len(names)

    def test_key_names_are_exact(self) -> None:
        k = KeySpace("q")
        assert (k.pending, k.scheduled, k.workers, k.dead, k.dead_index) == (
            "q",
            "{q}:scheduled",
            "{q}:workers",
            "{q}:dead",
            "{q}:dead:index",
        )
        assert k.inflight("w1") == "{q}:inflight:w1"
        assert k.result("t1") == "{q}:result:t1"
        assert k.accepted("t1") == "{q}:accepted:t1"
        assert k.accepted("t1").startswith(k.accepted_prefix)

    def test_result_channels_use_the_prefix_and_the_session(self) -> None:
        k = KeySpace("q", result_prefix="custom:results")
        assert k.result_channel("s1") == "custom:results:s1"
        assert k.result_channel_pattern == "custom:results:*"

    @pytest.mark.parametrize(
        "name",
        [
            "",
            "a{b",
            "a}b",
            "{q}",
            "a b",
            "a*",
            "a?",
            "a[b]",
            "a\nb",
            "tab\t",
            "caf\u00e9",
            "x" * (MAX_NAME_LENGTH + 1),
        ],
        ids=[
            "empty",
            "open-brace",
            "close-brace",
            "hash-tag",
            "space",
            "star",
            "question",
            "brackets",
            "newline",
            "tab",
            "non-ascii",
            "too-long",
        ],
    )
    def test_a_queue_name_that_could_escape_its_key_is_refused(self, name: str) -> None:
        with pytest.raises(InvalidTaskError, match=r"^queue name .* is not allowed"):
            KeySpace(name)

    def test_a_queue_name_that_is_not_text_is_refused(self) -> None:
        with pytest.raises(InvalidTaskError, match="queue name"):
            KeySpace(5)  # type: ignore[arg-type]

    def test_a_queue_name_of_the_longest_allowed_length_is_accepted(self) -> None:
        assert KeySpace("x" * MAX_NAME_LENGTH).queue == "x" * MAX_NAME_LENGTH

    @pytest.mark.parametrize("name", ["a b", "w*", "", "{x}"])
    def test_worker_and_task_ids_are_checked_before_they_enter_a_key(self, name: str) -> None:
        k = KeySpace("q")
        with pytest.raises(InvalidTaskError, match=r"^worker id"):
            k.inflight(name)
        with pytest.raises(InvalidTaskError, match=r"^task id"):
            k.result(name)

    def test_validate_name_returns_an_allowed_name_unchanged(self) -> None:
        assert validate_name("Ab0_.:-", "thing") == "Ab0_.:-"

    def test_no_queue_name_means_the_settings_queue(self) -> None:
        settings = QueueSettings(default_queue_name="other:q")
        assert KeySpace.of(None, settings).queue == "other:q"
        assert KeySpace.of("mine", settings).queue == "mine"

    # Was a package bug (issue 8): queue_name="" silently meant the default queue.
    def test_an_empty_queue_name_is_refused_not_read_as_the_default(self) -> None:
        with pytest.raises(InvalidTaskError, match=r"^queue name '' is not allowed"):
            KeySpace.of("", QueueSettings())


# --- backoff ----------------------------------------------------------------------------------

JUST_BELOW_ONE = math.nextafter(1.0, 0.0)


class TestExponentialDelay:
    """Delays double from the base up to the cap, moved at most ``jitter`` either way."""

    @pytest.mark.parametrize(("attempt", "expected"), [(1, 1.5), (2, 3.0), (3, 6.0), (5, 24.0)])
    def test_a_centred_random_number_gives_the_exact_exponential_delay(
        self, attempt: int, expected: float
    ) -> None:
        assert exponential_delay(attempt, 1.5, 1000.0, 0.1, rand=lambda: 0.5) == expected

    def test_the_lowest_random_number_removes_the_whole_jitter(self) -> None:
        assert exponential_delay(3, 1.0, 1000.0, 0.25, rand=lambda: 0.0) == 3.0

    def test_the_highest_random_number_adds_almost_the_whole_jitter(self) -> None:
        delay = exponential_delay(3, 1.0, 1000.0, 0.25, rand=lambda: JUST_BELOW_ONE)
        assert delay == pytest.approx(5.0)
        assert delay <= 5.0

    def test_without_jitter_the_random_number_does_not_matter(self) -> None:
        assert {
            exponential_delay(4, 2.0, 100.0, 0.0, rand=lambda r=r: r)
            for r in (0.0, 0.3, JUST_BELOW_ONE)
        } == {16.0}

    @pytest.mark.parametrize("rand", [0.5, JUST_BELOW_ONE])
    def test_the_cap_is_never_exceeded_even_by_jitter(self, rand: float) -> None:
        assert exponential_delay(10, 1.0, 60.0, 0.1, rand=lambda: rand) == 60.0
        assert exponential_delay(1, 1.0, 1.05, 0.1, rand=lambda: rand) <= 1.05

    def test_a_capped_delay_still_jitters_downwards(self) -> None:
        assert exponential_delay(10, 1.0, 60.0, 0.1, rand=lambda: 0.0) == pytest.approx(54.0)

    @pytest.mark.parametrize("attempt", [64, 1_000, 10**9, 10**100])
    def test_huge_attempt_numbers_give_the_cap_without_overflow(self, attempt: int) -> None:
        assert exponential_delay(attempt, 1.0, 60.0, 0.1, rand=lambda: 0.5) == 60.0
        assert exponential_delay(attempt, 1e300, 1e301, 0.0) == 1e301

    @pytest.mark.parametrize("attempt", [0, -1, -(10**9)])
    def test_attempts_below_one_get_the_base_delay(self, attempt: int) -> None:
        assert exponential_delay(attempt, 2.0, 60.0, 0.1, rand=lambda: 0.5) == 2.0

    @timing_free
    @given(
        st.integers(min_value=-5, max_value=10**6),
        st.floats(min_value=0.0, max_value=1e6),
        st.floats(min_value=0.0, max_value=1e6),
        st.floats(min_value=0.0, max_value=0.99),
        st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
    )
    def test_every_delay_lies_within_the_jitter_band_and_under_the_cap(
        self, attempt: int, base: float, cap: float, jitter: float, rand: float
    ) -> None:
        exact = min(cap, base * 2.0 ** min(max(attempt - 1, 0), 63))
        delay = exponential_delay(attempt, base, cap, jitter, rand=lambda: rand)
        assert 0.0 <= delay <= cap
        assert exact * (1 - jitter) * (1 - 1e-12) <= delay <= exact * (1 + jitter) * (1 + 1e-12)

    def test_the_default_random_source_stays_in_the_band(self) -> None:
        delays = {exponential_delay(2, 1.0, 60.0, 0.5) for _ in range(50)}
        assert all(1.0 <= d <= 3.0 for d in delays)
        assert len(delays) > 1


# --- connection URL masking -------------------------------------------------------------------


class TestMaskUrl:
    """``mask_url`` keeps a URL readable for logs but never shows its password."""

    @pytest.mark.parametrize(
        ("url", "expected"),
        [
            ("redis://alice:s3cr3t@redis.example:6379/0", "redis://alice:***@redis.example:6379/0"),
            ("redis://:s3cr3t@localhost:6380/2", "redis://:***@localhost:6380/2"),
            ("rediss://bob:s3cr3t@cache.internal/1", "rediss://bob:***@cache.internal/1"),
            ("redis://alice:p%40ss%3Aword@host:6379", "redis://alice:***@host:6379"),
        ],
    )
    def test_the_password_is_replaced_and_the_rest_kept(self, url: str, expected: str) -> None:
        assert mask_url(url) == expected

    @pytest.mark.parametrize(
        "url",
        [
            "redis://localhost:6379/0",
            "redis://alice@localhost:6379/0",
            "unix:///tmp/redis.sock?db=1",
        ],
    )
    def test_a_url_without_a_password_is_unchanged(self, url: str) -> None:
        assert mask_url(url) == url

    # Was a package bug: redis-py takes the password from the query string too
    # (redis.connection.parse_url passes unknown query arguments through as keywords), but
    # connection.mask_url only masks the userinfo, so this password reaches logs and errors.
    def test_a_password_given_in_the_query_string_is_hidden(self) -> None:
        assert "s3cr3t" not in mask_url("redis://localhost:6379/0?password=s3cr3t")

    # Was a package bug: mask_url rebuilds the netloc from parts.hostname, which drops the
    # brackets of an IPv6 address: "redis://:***@::1:6379/0" is no longer a valid URL.
    def test_an_ipv6_host_keeps_its_brackets(self) -> None:
        assert mask_url("redis://:s3cr3t@[::1]:6379/0") == "redis://:***@[::1]:6379/0"


class RecordingEvent(threading.Event):
    """A stop event that records each wait and returns at once: no test waits for real."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        return False


class Flaky:
    """A call that raises each of ``errors`` in turn, then returns ``value``."""

    def __init__(self, errors: list[Exception], value: object = "done") -> None:
        self.errors = list(errors)
        self.value = value
        self.calls = 0

    def __call__(self) -> object:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.value


RECONNECT_SETTINGS = QueueSettings(
    error_retry_delay=1.0, max_reconnect_delay=60.0, max_reconnect_attempts=3, retry_jitter=0.1
)
URL_WITH_PASSWORD = "redis://:s3cr3t@127.0.0.1:1/0"  # noqa: S105 - made up, must be masked


class TestReconnector:
    """Transient Redis errors are retried with backoff, then become QueueConnectionError."""

    def reconnector(self, stop: threading.Event, retries: list[int]) -> Reconnector:
        return Reconnector(
            URL_WITH_PASSWORD,
            "q",
            RECONNECT_SETTINGS,
            stop=stop,
            rand=lambda: 0.5,
            on_retry=lambda: retries.append(1),
        )

    def test_transient_failures_are_retried_with_doubling_waits_until_the_call_succeeds(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        stop, retries = RecordingEvent(), []
        call = Flaky([redis.ConnectionError("refused"), redis.TimeoutError("slow")])
        with caplog.at_level(logging.WARNING, logger="semibot_queue.connection"):
            assert self.reconnector(stop, retries).call("enqueue", call) == "done"
        assert (call.calls, len(retries), stop.waits) == (3, 2, [1.0, 2.0])
        first = caplog.records[0].getMessage()
        assert "queue q" in first
        assert "reconnect attempt 1/3" in first
        assert "s3cr3t" not in caplog.text

    def test_after_the_last_attempt_it_raises_queue_connection_error_with_a_masked_url(
        self,
    ) -> None:
        stop, retries = RecordingEvent(), []
        cause = redis.ConnectionError("refused")
        call = Flaky([redis.BusyLoadingError("loading"), redis.ConnectionError("x"), cause])
        with pytest.raises(
            QueueConnectionError, match=r"unreachable after 3 attempts \(dequeue\)"
        ) as caught:
            self.reconnector(stop, retries).call("dequeue", call)
        assert "redis://:***@127.0.0.1:1/0" in str(caught.value)
        assert "s3cr3t" not in str(caught.value)
        assert caught.value.__cause__ is cause
        assert (call.calls, len(retries)) == (3, 2)

    def test_an_error_that_is_not_transient_is_raised_at_once(self) -> None:
        stop, retries = RecordingEvent(), []
        call = Flaky([redis.ResponseError("WRONGTYPE")])
        with pytest.raises(RedisCommandError, match="WRONGTYPE"):
            self.reconnector(stop, retries).call("enqueue", call)
        assert (call.calls, retries, stop.waits) == (1, [], [])

    @pytest.mark.parametrize(("failures", "expected"), [(1, 1.0), (2, 2.0), (4, 8.0), (30, 60.0)])
    def test_the_delay_follows_the_reconnect_settings(self, failures: int, expected: float) -> None:
        reconnector = Reconnector(URL_WITH_PASSWORD, "q", RECONNECT_SETTINGS, rand=lambda: 0.5)
        assert reconnector.delay(failures) == expected

    def test_a_retry_needs_no_hook(self) -> None:
        stop = RecordingEvent()
        reconnector = Reconnector(URL_WITH_PASSWORD, "q", RECONNECT_SETTINGS, stop=stop)
        assert reconnector.call("ping", Flaky([redis.ConnectionError("refused")])) == "done"
        assert len(stop.waits) == 1

    def test_its_url_is_masked_for_logs(self) -> None:
        assert (
            Reconnector(URL_WITH_PASSWORD, "q", RECONNECT_SETTINGS).url
            == "redis://:***@127.0.0.1:1/0"
        )

    def test_make_client_bounds_every_call_by_the_socket_timeout_and_connects_lazily(self) -> None:
        client = make_client("redis://127.0.0.1:1/3", QueueSettings(socket_timeout=2.5))
        try:
            options = client.connection_pool.connection_kwargs
            assert (options["socket_timeout"], options["socket_connect_timeout"]) == (2.5, 2.5)
            assert options["db"] == 3
        finally:
            client.close()


# --- errors and the public surface ------------------------------------------------------------


class TestErrorTree:
    """Every error of the package descends from QueueError and shadows no builtin."""

    @pytest.mark.parametrize(
        "error",
        [
            QueueFullError,
            QueueConnectionError,
            InvalidTaskError,
            SettingsError,
            PermanentTaskError,
            DuplicateTaskError,
        ],
    )
    def test_every_error_is_a_queue_error(self, error: type[Exception]) -> None:
        assert issubclass(error, QueueError)
        assert not hasattr(builtins, error.__name__)

    def test_the_root_is_an_ordinary_exception(self) -> None:
        assert QueueError.__bases__ == (Exception,)


#: The names DESIGN.md section 1 fixes: users and checks import them.
DESIGN_PUBLIC_NAMES = {
    "TaskPayload",
    "TaskMessage",
    "TaskResult",
    "TaskProducer",
    "TaskConsumer",
    "DeadLetterQueue",
    "QueueSettings",
    "QueueError",
    "QueueFullError",
    "QueueConnectionError",
    "InvalidTaskError",
    "PermanentTaskError",
}


def _public_names() -> list[str]:
    """Names the package itself defines and shows: no modules, no imported helpers."""
    found = []
    for name, value in vars(semibot_queue).items():
        if name.startswith("_") or inspect.ismodule(value):
            continue
        if getattr(value, "__module__", "").startswith("semibot_queue"):
            found.append(name)
    return found


class TestExportedMembers:
    """``__all__`` is exactly the public names, sorted, each importable and documented."""

    def test_all_is_exactly_the_public_names_sorted(self) -> None:
        assert semibot_queue.__all__ == sorted(_public_names())

    def test_every_name_the_design_fixes_is_exported(self) -> None:
        assert DESIGN_PUBLIC_NAMES.issubset(semibot_queue.__all__)

    @pytest.mark.parametrize("name", semibot_queue.__all__)
    def test_every_exported_name_imports_from_the_package(self, name: str) -> None:
        namespace: dict[str, Any] = {}
        exec(f"from semibot_queue import {name}", namespace)  # noqa: S102 - the import is the test
        assert namespace[name] is getattr(semibot_queue, name)

    @pytest.mark.parametrize("name", semibot_queue.__all__)
    def test_every_exported_name_and_its_public_members_have_docstrings(self, name: str) -> None:
        value = getattr(semibot_queue, name)
        assert inspect.getdoc(value), name
        for member, attribute in vars(value).items():
            if member.startswith("_"):
                continue
            target = attribute.fget if isinstance(attribute, property) else attribute
            target = getattr(target, "__func__", target)
            if callable(target):
                assert target.__doc__, f"{name}.{member}"

    def test_the_version_is_a_string(self) -> None:
        assert isinstance(semibot_queue.__version__, str)
        assert semibot_queue.__version__
