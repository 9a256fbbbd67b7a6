"""Models, codec, settings, keys, backoff, reconnects, the public surface: no Redis server here.

Tests marked "was a package bug" pin defects found while writing them
and pass once the package is fixed.
"""

from __future__ import annotations

import builtins
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
from semibot_queue import constants
from semibot_queue.backoff import exponential_delay
from semibot_queue.codec import Codec, fields_of, split_redelivery, task_id_of
from semibot_queue.connection import Reconnector, make_client, mask_url
from semibot_queue.constants import MAX_NAME_LENGTH
from semibot_queue.errors import (
    InvalidTaskError,
    PermanentTaskError,
    QueueConnectionError,
    QueueError,
    QueueFullError,
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
    fields = {name: GOOD_MESSAGE[name] for name in fields_of(TaskPayload)}
    return TaskPayload(**{**fields, **changes})


def message(**changes: Any) -> TaskMessage:
    """A valid TaskMessage, with ``changes`` applied."""
    return TaskMessage(**{**GOOD_MESSAGE, **changes})


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
    status=st.sampled_from(["succeeded", "failed"]),
    result=json_values,
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
    """A TaskResult's status is succeeded or failed, nothing else."""

    @pytest.mark.parametrize("status", ["succeeded", "failed"])
    def test_the_two_known_statuses_are_accepted(self, status: str) -> None:
        assert TaskResult(task_id="t", session_id="s", status=status).status == status  # type: ignore[arg-type]

    @pytest.mark.parametrize("status", ["done", "", None, "SUCCEEDED"])
    def test_an_unknown_status_is_refused_by_name(self, status: object) -> None:
        with pytest.raises(InvalidTaskError, match=r"^status: must be one of"):
            TaskResult(task_id="t", session_id="s", status=status)  # type: ignore[arg-type]


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
            ("metadata", None, "expected a JSON object, got NoneType"),
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
    """A task a worker takes counts this take plus every delivery lost to a dead worker."""

    codec = Codec(ROOMY)

    def test_a_first_take_counts_one_delivery(self) -> None:
        stored = self.codec.encode_message(message(delivery_count=0))
        assert self.codec.decode_delivery(stored).delivery_count == 1

    def test_a_take_adds_to_the_deliveries_already_recorded(self) -> None:
        stored = self.codec.encode_message(message(delivery_count=4))
        assert self.codec.decode_delivery(stored).delivery_count == 5

    def test_deliveries_lost_to_dead_workers_are_counted_from_the_marker(self) -> None:
        stored = self.codec.encode_message(message(delivery_count=1))
        delivered = self.codec.decode_delivery(b"~2~" + stored)
        assert delivered.delivery_count == 4
        assert attrs.evolve(delivered, delivery_count=1) == message(delivery_count=1)

    def test_a_task_without_a_delivery_count_starts_from_zero(self) -> None:
        data = {k: v for k, v in GOOD_MESSAGE.items() if k != "delivery_count"}
        assert self.codec.decode_delivery(b"~1~" + as_json(data)).delivery_count == 2

    def test_the_size_limit_applies_to_the_task_not_the_marker(self) -> None:
        raw = self.codec.encode_message(message())
        assert Codec(len(raw)).decode_delivery(b"~12~" + raw).task_id == "task-1"
        with pytest.raises(InvalidTaskError, match=rf"^payload of {len(raw)} bytes exceeds"):
            Codec(len(raw) - 1).decode_delivery(b"~12~" + raw)

    def test_a_delivery_count_of_the_wrong_type_is_named_not_incremented(self) -> None:
        raw = as_json({**GOOD_MESSAGE, "delivery_count": True})
        with pytest.raises(InvalidTaskError, match=r"got bool @ TaskMessage\.delivery_count"):
            self.codec.decode_delivery(b"~1~" + raw)

    @pytest.mark.parametrize(
        ("raw", "expected"),
        [
            (b"~1~not json", r"^payload is not JSON"),
            (b"~1~\xff", r"^payload is not UTF-8 text"),
            (b"~1~[1]", r"^TaskMessage: expected a JSON object, got list"),
        ],
    )
    def test_a_delivery_that_is_not_a_task_is_refused(self, raw: bytes, expected: str) -> None:
        with pytest.raises(InvalidTaskError, match=expected):
            self.codec.decode_delivery(raw)


class TestEncodingRefusesWhatIsNotJson:
    """Only JSON crosses Redis: a task or result that cannot be JSON is refused at encode time."""

    codec = Codec(ROOMY)

    @pytest.mark.parametrize("field", ["config", "metadata"])
    def test_a_config_or_metadata_value_that_is_not_json_is_named(self, field: str) -> None:
        with pytest.raises(InvalidTaskError, match=rf"^{field}: not JSON-serialisable"):
            self.codec.encode_message(message(**{field: {"when": object()}}))

    def test_message_text_that_cannot_be_utf8_is_named(self) -> None:
        with pytest.raises(InvalidTaskError, match=r"^messages: not JSON-serialisable"):
            self.codec.encode_message(message(messages=[{"role": "user", "content": "\ud800"}]))

    def test_an_identifier_that_cannot_be_utf8_is_refused(self) -> None:
        with pytest.raises(InvalidTaskError, match=r"not JSON-serialisable"):
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
        with pytest.raises(InvalidTaskError, match=r"^config: not JSON-serialisable"):
            self.codec.encode_message(message(config={"temperature": value}))


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


class TestRedeliveryMarker:
    """``~N~<task>`` marks deliveries lost to dead workers; the helpers read it back."""

    @timing_free
    @given(st.integers(min_value=0, max_value=10**30), st.binary())
    def test_split_redelivery_reads_back_any_marker(self, lost: int, body: bytes) -> None:
        assert split_redelivery(b"~%d~" % lost + body) == (lost, body)

    @pytest.mark.parametrize(
        "raw",
        [b'{"task_id": "t"}', b"", b"~~body", b"~x~body", b"a~1~b", b"~1", b"~-1~body"],
    )
    def test_split_redelivery_leaves_unmarked_bytes_alone(self, raw: bytes) -> None:
        assert split_redelivery(raw) == (0, raw)

    def test_split_redelivery_strips_only_the_first_marker(self) -> None:
        assert split_redelivery(b"~2~~1~body") == (2, b"~1~body")

    def test_task_id_of_reads_the_task_id_behind_a_marker(self) -> None:
        assert task_id_of(b'{"task_id": "abc"}') == "abc"
        assert task_id_of(b'~3~{"task_id": "abc"}') == "abc"

    @pytest.mark.parametrize(
        "body",
        [b"not json", b"\xff\xfe", b"[1, 2]", b'{"task_id": 5}', b'{"id": "x"}', b""],
    )
    def test_task_id_of_names_an_unreadable_task_by_the_sha1_of_its_body(self, body: bytes) -> None:
        expected = "raw-" + hashlib.sha1(body, usedforsecurity=False).hexdigest()
        assert task_id_of(body) == expected
        assert task_id_of(b"~2~" + body) == expected


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
        ("changes", "low", "high"),
        [
            (
                {"queue_length_warning_threshold": 10_001},
                "queue_length_warning_threshold",
                "max_queue_length",
            ),
            ({"error_retry_delay": 61.0}, "error_retry_delay", "max_reconnect_delay"),
            ({"retry_base_delay": 301.0}, "retry_base_delay", "retry_max_delay"),
            ({"heartbeat_interval": 11.0}, "heartbeat_interval", "worker_dead_after"),
            ({"stop_poll_slice": 6.0}, "stop_poll_slice", "socket_timeout"),
            ({"pubsub_message_timeout": 6.0}, "pubsub_message_timeout", "socket_timeout"),
        ],
    )
    def test_a_value_above_its_bound_is_refused_naming_both(
        self, changes: dict[str, Any], low: str, high: str
    ) -> None:
        with pytest.raises(
            SettingsError, match=rf"^setting {low} \(.*\) must not exceed {high} \("
        ):
            QueueSettings(**changes)

    def test_a_bound_may_be_reached_exactly(self) -> None:
        settings = QueueSettings(max_queue_length=10, queue_length_warning_threshold=10)
        assert settings.queue_length_warning_threshold == settings.max_queue_length

    def test_a_worker_must_miss_two_heartbeats_before_it_is_dead(self) -> None:
        with pytest.raises(
            SettingsError,
            match=r"worker_dead_after \(10.0\) must be at least twice heartbeat_interval \(6.0\)",
        ):
            QueueSettings(heartbeat_interval=6.0)
        assert QueueSettings(heartbeat_interval=5.0).worker_dead_after == 10.0

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
            QueueSettings.from_env({"SEMIBOT_QUEUE_MAX_QUEUE_LENGTH": "100"})


# --- keys -------------------------------------------------------------------------------------


class TestKeySpace:
    """Every key of a queue carries its ``{queue}`` hash tag; unsafe names are refused."""

    @pytest.mark.parametrize(
        "key",
        [
            lambda k: k.pending,
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
            "pending",
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
            "{q}:pending",
            "{q}:scheduled",
            "{q}:workers",
            "{q}:dead",
            "{q}:dead:index",
        )
        assert k.inflight("w1") == "{q}:inflight:w1"
        assert k.result("t1") == "{q}:result:t1"

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
        with pytest.raises(redis.ResponseError):
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
        [QueueFullError, QueueConnectionError, InvalidTaskError, SettingsError, PermanentTaskError],
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
