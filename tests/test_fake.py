"""The fake Hospital Directory API, in process: every row of the contract and every fault."""

from __future__ import annotations

import json
import random
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from typing import Any

import anyio
import httpx
import pytest

from hospital_bulk._exceptions import ConfigurationError
from hospital_bulk.testing import FakeDirectory, Fault, Faults, RecordedRequest, StoredHospital

BATCH = "3f2b8c1e-5d4a-4c6b-9e7f-0a1b2c3d4e5f"
OTHER_BATCH = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}$")
NOT_ACTIVATABLE = "Cannot activate batch: one or more hospitals in the batch are already active"
EMPTY_BATCH = "No hospitals found with the specified batch ID"

pytestmark = pytest.mark.anyio


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fake(clock: FakeClock) -> FakeDirectory:
    return FakeDirectory(clock=clock, seed=1)


@asynccontextmanager
async def client_for(
    fake: FakeDirectory, address: str = "127.0.0.1"
) -> AsyncIterator[httpx.AsyncClient]:
    transport = fake.transport(client_address=address)
    async with httpx.AsyncClient(transport=transport, base_url="http://fake") as client:
        yield client


def row(name: object = "General", **extra: Any) -> dict[str, Any]:
    return {"name": name, "address": "1 Main St", "phone": "555-0100", **extra}


async def create(client: httpx.AsyncClient, name: str = "General", **extra: Any) -> httpx.Response:
    return await client.post("/hospitals/", json=row(name, **extra))


# ------------------------------------------------------------------------------------ endpoints


async def test_root_answers_ok(fake: FakeDirectory) -> None:
    async with client_for(fake) as client:
        response = await client.get("/")
    assert response.status_code == 200
    assert response.json() == {"status": "OK"}


async def test_create_answers_200_with_the_hospital() -> None:
    fake = FakeDirectory(now=lambda: datetime(2025, 9, 20, 9, 50, 50, 824234))
    async with client_for(fake) as client:
        plain = await create(client, "Plain")
        batched = await create(client, "Batched", creation_batch_id=BATCH)
    assert plain.status_code == 200
    assert plain.json() == {
        "id": 1,
        "name": "Plain",
        "address": "1 Main St",
        "phone": "555-0100",
        "creation_batch_id": None,
        "active": True,
        "created_at": "2025-09-20T09:50:50.824234",
    }
    assert batched.status_code == 200
    assert batched.json()["id"] == 2
    assert batched.json()["active"] is False
    assert batched.json()["creation_batch_id"] == BATCH
    assert [h.id for h in fake.hospitals] == [1, 2]
    assert isinstance(fake.hospitals[0], StoredHospital)


async def test_timestamps_are_naive_and_always_carry_microseconds() -> None:
    moments = iter(
        [
            datetime(2025, 1, 2, 3, 4, 5),  # no microseconds: still printed
            datetime(2025, 1, 2, 3, 4, 5, 7, tzinfo=timezone.utc),  # aware: made naive
        ]
    )
    fake = FakeDirectory(now=lambda: next(moments))
    async with client_for(fake) as client:
        first = (await create(client, "A")).json()["created_at"]
        second = (await create(client, "B")).json()["created_at"]
    assert first == "2025-01-02T03:04:05.000000"
    assert second == "2025-01-02T03:04:05.000007"
    for stamp in (first, second):
        assert TIMESTAMP.match(stamp), stamp
        assert datetime.fromisoformat(stamp).tzinfo is None


async def test_default_clock_gives_naive_timestamps_with_microseconds() -> None:
    fake = FakeDirectory()
    async with client_for(fake) as client:
        stamp = (await create(client)).json()["created_at"]
    assert TIMESTAMP.match(stamp), stamp
    assert fake.hospitals[0].created_at.tzinfo is None


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2025, 9, 20, 9, 50, 50, 824234),
        datetime(2025, 9, 20, 9, 50, 50),
        datetime(1000, 1, 1),
        datetime(999, 12, 31, 23, 59, 59, 1),
        datetime(2025, 9, 20, 9, 50, 50, 5, tzinfo=timezone.utc),
    ],
)
def test_a_stored_hospital_prints_its_timestamp_as_the_strftime_format(moment: datetime) -> None:
    hospital = StoredHospital(1, "A", "B", None, None, True, moment)
    assert hospital.to_dict()["created_at"] == moment.strftime("%Y-%m-%dT%H:%M:%S.%f")


async def test_list_get_put_delete(fake: FakeDirectory) -> None:
    async with client_for(fake) as client:
        await create(client, "A")
        await create(client, "B", creation_batch_id=BATCH)
        listed = await client.get("/hospitals/")
        got = await client.get("/hospitals/2")
        put = await client.put(
            "/hospitals/2",
            json={"name": "B2", "phone": None, "active": True, "creation_batch_id": OTHER_BATCH},
        )
        deleted = await client.delete("/hospitals/1")
        after = await client.get("/hospitals/1")
        delete_again = await client.delete("/hospitals/1")
        put_missing = await client.put("/hospitals/99", json={"name": "X"})
    assert listed.status_code == 200
    assert [h["name"] for h in listed.json()] == ["A", "B"]
    assert got.status_code == 200
    assert got.json()["name"] == "B"
    assert put.status_code == 200
    body = put.json()
    assert (body["name"], body["address"], body["phone"]) == ("B2", "1 Main St", None)
    # creation_batch_id and active cannot be changed.
    assert (body["creation_batch_id"], body["active"]) == (BATCH, False)
    assert body["created_at"] == got.json()["created_at"]
    assert deleted.status_code == 204
    assert deleted.content == b""
    for response in (after, delete_again, put_missing):
        assert response.status_code == 404
        assert response.json() == {"detail": "Hospital not found"}
    assert [h.name for h in fake.hospitals] == ["B2"]


async def test_put_with_null_name_keeps_the_name(fake: FakeDirectory) -> None:
    async with client_for(fake) as client:
        await create(client, "A")
        response = await client.put("/hospitals/1", json={"name": None, "address": "2 Side St"})
    assert response.status_code == 200
    assert (response.json()["name"], response.json()["address"]) == ("A", "2 Side St")


async def test_ids_count_from_1_are_never_reused_and_restart_with_the_service(
    fake: FakeDirectory,
) -> None:
    async with client_for(fake) as client:
        ids = [(await create(client, f"H{i}")).json()["id"] for i in range(3)]
        await client.delete("/hospitals/3")
        after_delete = (await create(client, "H3")).json()["id"]
        fake.restart()
        listed_after_restart = (await client.get("/hospitals/")).json()
        after_restart = (await create(client, "again")).json()["id"]
    assert ids == [1, 2, 3]
    assert after_delete == 4
    assert listed_after_restart == []
    assert after_restart == 1
    # The request log survives a restart.
    assert len(fake.creates()) == 5


# ------------------------------------------------------------------------ redirects, 404, 405


@pytest.mark.parametrize(
    ("method", "path", "location"),
    [
        ("POST", "/hospitals", "http://fake/hospitals/"),
        ("GET", "/hospitals", "http://fake/hospitals/"),
        ("GET", "/hospitals/1/", "http://fake/hospitals/1"),
        ("PUT", "/hospitals/1/", "http://fake/hospitals/1"),
        ("GET", f"/hospitals/batch/{BATCH}/", f"http://fake/hospitals/batch/{BATCH}"),
        (
            "PATCH",
            f"/hospitals/batch/{BATCH}/activate/",
            f"http://fake/hospitals/batch/{BATCH}/activate",
        ),
        ("GET", "/hospitals?x=1", "http://fake/hospitals/?x=1"),
    ],
)
async def test_wrong_trailing_slash_redirects_307(
    fake: FakeDirectory, method: str, path: str, location: str
) -> None:
    async with client_for(fake) as client:
        response = await client.request(method, path, json=row() if method != "GET" else None)
    assert response.status_code == 307
    assert response.headers["location"] == location
    assert response.content == b""
    assert fake.hospitals == []
    assert fake.requests[-1].route is None
    assert fake.requests[-1].status == 307


async def test_redirect_location_uses_the_host_header(fake: FakeDirectory) -> None:
    transport = fake.transport()
    async with httpx.AsyncClient(transport=transport, base_url="http://example.test:8080") as c:
        response = await c.post("/hospitals", json=row())
    assert response.headers["location"] == "http://example.test:8080/hospitals/"


@pytest.mark.parametrize("path", ["/nope", "/hospitals/1/2/3", "/hospitals/batch/x/y/z", "/api/"])
async def test_unknown_path_is_404_not_found(fake: FakeDirectory, path: str) -> None:
    async with client_for(fake) as client:
        response = await client.get(path)
    assert response.status_code == 404
    assert response.json() == {"detail": "Not Found"}


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PATCH", "/hospitals/", "GET"),
        ("POST", "/hospitals/1", "GET"),
        ("POST", "/", "GET"),
        ("GET", f"/hospitals/batch/{BATCH}/activate", "PATCH"),
        ("HEAD", "/", "GET"),
    ],
)
async def test_known_path_with_wrong_method_is_405(
    fake: FakeDirectory, method: str, path: str, allow: str
) -> None:
    async with client_for(fake) as client:
        response = await client.request(method, path)
    assert response.status_code == 405
    if method != "HEAD":
        assert response.json() == {"detail": "Method Not Allowed"}
    assert response.headers["allow"] == allow


async def test_batch_word_alone_is_a_non_integer_hospital_id(fake: FakeDirectory) -> None:
    async with client_for(fake) as client:
        response = await client.get("/hospitals/batch")
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["path", "hospital_id"]


# ----------------------------------------------------------------------------------------- 422


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (
            row(""),
            {
                "type": "string_too_short",
                "loc": ["body", "name"],
                "msg": "String should have at least 1 character",
                "input": "",
                "ctx": {"min_length": 1},
            },
        ),
        (
            row("   "),
            {
                "type": "value_error",
                "loc": ["body", "name"],
                "msg": "Value error, must not be empty or only white space",
                "input": "   ",
                "ctx": {"error": {}},
            },
        ),
        (
            {"name": "A", "address": " \t"},
            {
                "type": "value_error",
                "loc": ["body", "address"],
                "msg": "Value error, must not be empty or only white space",
                "input": " \t",
                "ctx": {"error": {}},
            },
        ),
        (
            row(phone=5550100),
            {
                "type": "string_type",
                "loc": ["body", "phone"],
                "msg": "Input should be a valid string",
                "input": 5550100,
            },
        ),
        (
            row(name=12),
            {
                "type": "string_type",
                "loc": ["body", "name"],
                "msg": "Input should be a valid string",
                "input": 12,
            },
        ),
        (
            {"address": "1 Main St"},
            {
                "type": "missing",
                "loc": ["body", "name"],
                "msg": "Field required",
                "input": {"address": "1 Main St"},
            },
        ),
    ],
)
async def test_invalid_create_bodies_are_422(
    fake: FakeDirectory, body: dict[str, Any], error: dict[str, Any]
) -> None:
    async with client_for(fake) as client:
        response = await client.post("/hospitals/", json=body)
    assert response.status_code == 422
    assert response.json() == {"detail": [error]}
    assert fake.hospitals == []


async def test_bad_batch_uuid_is_422(fake: FakeDirectory) -> None:
    async with client_for(fake) as client:
        response = await create(client, creation_batch_id="not-a-uuid")
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["type"] == "uuid_parsing"
    assert error["loc"] == ["body", "creation_batch_id"]
    assert error["input"] == "not-a-uuid"
    assert error["msg"].startswith("Input should be a valid UUID")
    assert fake.hospitals == []


async def test_every_error_is_listed_at_once(fake: FakeDirectory) -> None:
    async with client_for(fake) as client:
        response = await client.post(
            "/hospitals/", json={"name": "", "phone": 1, "creation_batch_id": "x"}
        )
    locs = [e["loc"] for e in response.json()["detail"]]
    assert locs == [
        ["body", "name"],
        ["body", "address"],
        ["body", "phone"],
        ["body", "creation_batch_id"],
    ]


@pytest.mark.parametrize(
    ("content", "headers", "error"),
    [
        (
            b'{"name": "A",',
            {"content-type": "application/json"},
            {
                "type": "json_invalid",
                "loc": ["body", 13],
                "msg": "JSON decode error",
                "input": {},
                "ctx": {"error": "Expecting property name enclosed in double quotes"},
            },
        ),
        (
            b"",
            {"content-type": "application/json"},
            {"type": "missing", "loc": ["body"], "msg": "Field required", "input": None},
        ),
        (
            b"[1, 2]",
            {"content-type": "application/json"},
            {
                "type": "model_attributes_type",
                "loc": ["body"],
                "msg": "Input should be a valid dictionary or object to extract fields from",
                "input": [1, 2],
            },
        ),
        (
            b"name=A",
            {"content-type": "application/x-www-form-urlencoded"},
            {
                "type": "model_attributes_type",
                "loc": ["body"],
                "msg": "Input should be a valid dictionary or object to extract fields from",
                "input": "name=A",
            },
        ),
    ],
)
async def test_unreadable_bodies_are_422(
    fake: FakeDirectory, content: bytes, headers: dict[str, str], error: dict[str, Any]
) -> None:
    async with client_for(fake) as client:
        response = await client.post("/hospitals/", content=content, headers=headers)
    assert response.status_code == 422
    assert response.json() == {"detail": [error]}


@pytest.mark.parametrize(
    ("method", "path", "json_body"),
    [
        ("GET", "/hospitals/abc", None),
        ("DELETE", "/hospitals/1.5", None),
        ("PUT", "/hospitals/x", {}),
    ],
)
async def test_non_integer_id_is_422(
    fake: FakeDirectory, method: str, path: str, json_body: object
) -> None:
    async with client_for(fake) as client:
        response = await client.request(method, path, json=json_body)
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["type"] == "int_parsing"
    assert error["loc"] == ["path", "hospital_id"]
    assert error["msg"] == "Input should be a valid integer, unable to parse string as an integer"


async def test_put_validates_path_and_body_together(fake: FakeDirectory) -> None:
    async with client_for(fake) as client:
        response = await client.put("/hospitals/abc", json={"name": " "})
    assert [e["loc"] for e in response.json()["detail"]] == [
        ["path", "hospital_id"],
        ["body", "name"],
    ]


@pytest.mark.parametrize(
    ("method", "suffix"), [("GET", ""), ("PATCH", "/activate"), ("DELETE", "")]
)
async def test_non_uuid_batch_is_422(fake: FakeDirectory, method: str, suffix: str) -> None:
    async with client_for(fake) as client:
        response = await client.request(method, f"/hospitals/batch/not-a-uuid{suffix}")
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["type"] == "uuid_parsing"
    assert error["loc"] == ["path", "batch_id"]
    assert error["input"] == "not-a-uuid"


async def test_unknown_fields_are_ignored(fake: FakeDirectory) -> None:
    async with client_for(fake) as client:
        response = await create(client, id=77, active=False, email="x@example.org")
    assert response.status_code == 200
    assert response.json()["id"] == 1
    assert response.json()["active"] is True
    assert "email" not in response.json()


async def test_phone_is_optional_and_free_form(fake: FakeDirectory) -> None:
    async with client_for(fake) as client:
        none = await client.post("/hospitals/", json={"name": "A", "address": "B"})
        empty = await client.post("/hospitals/", json={"name": "A", "address": "B", "phone": ""})
        long = await client.post("/hospitals/", json=row(phone="x" * 5000))
    assert none.status_code == 200
    assert none.json()["phone"] is None
    assert empty.json()["phone"] == ""
    assert long.status_code == 200


# --------------------------------------------------------------------------------------- batches


async def test_batch_id_is_echoed_lower_case_and_matched_case_insensitively(
    fake: FakeDirectory,
) -> None:
    async with client_for(fake) as client:
        created = await create(client, creation_batch_id=BATCH.upper())
        by_upper = await client.get(f"/hospitals/batch/{BATCH.upper()}")
        by_lower = await client.get(f"/hospitals/batch/{BATCH}")
        activated = await client.patch(f"/hospitals/batch/{BATCH.upper()}/activate")
    assert created.json()["creation_batch_id"] == BATCH
    assert by_upper.status_code == 200
    assert by_upper.json() == by_lower.json()
    assert len(by_lower.json()) == 1
    assert activated.status_code == 200
    assert [h.active for h in fake.batch(uuid.UUID(BATCH))] == [True]
    assert fake.batch(BATCH.upper()) == fake.batch(BATCH)


@pytest.mark.parametrize(
    ("method", "suffix"), [("GET", ""), ("PATCH", "/activate"), ("DELETE", "")]
)
async def test_empty_or_unknown_batch_is_404(fake: FakeDirectory, method: str, suffix: str) -> None:
    async with client_for(fake) as client:
        await create(client, creation_batch_id=OTHER_BATCH)
        unknown = await client.request(method, f"/hospitals/batch/{BATCH}{suffix}")
        await create(client, creation_batch_id=BATCH)
        await client.delete("/hospitals/2")  # the batch exists no more: it is empty
        emptied = await client.request(method, f"/hospitals/batch/{BATCH}{suffix}")
    for response in (unknown, emptied):
        assert response.status_code == 404
        assert response.json() == {"detail": EMPTY_BATCH}


async def test_batch_listing_activation_and_deletion(fake: FakeDirectory) -> None:
    async with client_for(fake) as client:
        for i in range(3):
            await create(client, f"H{i}", creation_batch_id=BATCH)
        await create(client, "elsewhere", creation_batch_id=OTHER_BATCH)
        listed = await client.get(f"/hospitals/batch/{BATCH}")
        first = await client.patch(f"/hospitals/batch/{BATCH}/activate")
        second = await client.patch(f"/hospitals/batch/{BATCH}/activate")
        deleted = await client.delete(f"/hospitals/batch/{BATCH}")
        after = await client.get(f"/hospitals/batch/{BATCH}")
    assert [h["name"] for h in listed.json()] == ["H0", "H1", "H2"]
    assert all(h["active"] is False for h in listed.json())
    assert first.status_code == 200
    assert first.json()["activated_count"] == 3
    assert isinstance(first.json()["message"], str)
    assert second.status_code == 400
    assert second.json() == {"detail": NOT_ACTIVATABLE}
    assert deleted.status_code == 200
    assert deleted.json()["deleted_count"] == 3
    assert isinstance(deleted.json()["message"], str)
    assert after.status_code == 404
    assert [h.name for h in fake.hospitals] == ["elsewhere"]
    assert fake.hospitals[0].active is False


async def test_activation_is_all_or_nothing(fake: FakeDirectory) -> None:
    async with client_for(fake) as client:
        await create(client, "A", creation_batch_id=BATCH)
        await client.patch(f"/hospitals/batch/{BATCH}/activate")
        await create(client, "late", creation_batch_id=BATCH)
        response = await client.patch(f"/hospitals/batch/{BATCH}/activate")
    assert response.status_code == 400
    assert response.json() == {"detail": NOT_ACTIVATABLE}
    assert {h.name: h.active for h in fake.batch(BATCH)} == {"A": True, "late": False}


async def test_batch_cap_is_400(clock: FakeClock) -> None:
    fake = FakeDirectory(clock=clock, create_rate=None)
    async with client_for(fake) as client:
        statuses = [
            (await create(client, f"H{i}", creation_batch_id=BATCH)).status_code for i in range(20)
        ]
        full = await create(client, "21st", creation_batch_id=BATCH)
        other = await create(client, "other batch", creation_batch_id=OTHER_BATCH)
    assert statuses == [200] * 20
    assert full.status_code == 400
    assert full.json() == {"detail": "Batch cannot exceed 20 hospitals"}
    assert other.status_code == 200
    assert len(fake.batch(BATCH)) == 20


async def test_batch_cap_message_names_the_setting() -> None:
    fake = FakeDirectory(batch_cap=2)
    async with client_for(fake) as client:
        for _ in range(2):
            await create(client, creation_batch_id=BATCH)
        response = await create(client, creation_batch_id=BATCH)
    assert response.json() == {"detail": "Batch cannot exceed 2 hospitals"}


async def test_the_batch_cap_is_racy_under_concurrent_creates() -> None:
    fake = FakeDirectory(create_latency=0.05, create_rate=None)
    statuses: list[int] = []
    async with client_for(fake) as client:

        async def one(i: int) -> None:
            statuses.append((await create(client, f"H{i}", creation_batch_id=BATCH)).status_code)

        async with anyio.create_task_group() as tg:
            for i in range(25):
                tg.start_soon(one, i)
        late = await create(client, "late", creation_batch_id=BATCH)
    # Every create passed the cap check before any of them committed.
    assert statuses == [200] * 25
    assert len(fake.batch(BATCH)) == 25 > 20
    assert late.status_code == 400


async def test_storage_cap_drops_the_oldest() -> None:
    fake = FakeDirectory(max_hospitals=3)
    async with client_for(fake) as client:
        for i in range(5):
            await create(client, f"H{i}")
        gone = await client.get("/hospitals/1")
        kept = await client.get("/hospitals/3")
        listed = await client.get("/hospitals/")
    assert [h.id for h in fake.hospitals] == [3, 4, 5]
    assert gone.status_code == 404
    assert kept.status_code == 200
    assert [h["id"] for h in listed.json()] == [3, 4, 5]


async def test_batch_operations_forget_hospitals_the_storage_cap_dropped() -> None:
    fake = FakeDirectory(max_hospitals=3, batch_cap=2, create_rate=None, other_rate=None)
    async with client_for(fake) as client:
        for name in ("A1", "A2"):
            await create(client, name, creation_batch_id=BATCH)
        await create(client, "B1", creation_batch_id=OTHER_BATCH)
        full = await create(client, "A3", creation_batch_id=BATCH)
        await create(client, "plain")  # drops A1
        partly = await client.get(f"/hospitals/batch/{BATCH}")
        refilled = await create(client, "A3", creation_batch_id=BATCH)  # drops A2
        await create(client, "plain 2")  # drops B1
        gone = [
            await client.request(method, f"/hospitals/batch/{OTHER_BATCH}{suffix}")
            for method, suffix in (("GET", ""), ("PATCH", "/activate"), ("DELETE", ""))
        ]
        activated = await client.patch(f"/hospitals/batch/{BATCH}/activate")
    assert full.json() == {"detail": "Batch cannot exceed 2 hospitals"}
    assert [h["name"] for h in partly.json()] == ["A2"]
    assert refilled.status_code == 200  # A1 no longer counts against the cap
    assert [(r.status_code, r.json()) for r in gone] == [(404, {"detail": EMPTY_BATCH})] * 3
    assert activated.json()["activated_count"] == 1
    assert [(h.name, h.active) for h in fake.batch(BATCH)] == [("A3", True)]
    assert fake.batch(OTHER_BATCH) == []
    assert [h.id for h in fake.hospitals] == [4, 5, 6]


async def test_a_deleted_hospital_leaves_its_batch() -> None:
    fake = FakeDirectory(batch_cap=2)
    async with client_for(fake) as client:
        await create(client, "A1", creation_batch_id=BATCH)
        await create(client, "A2", creation_batch_id=BATCH)
        await client.delete("/hospitals/1")
        listed = await client.get(f"/hospitals/batch/{BATCH}")
        refilled = await create(client, "A3", creation_batch_id=BATCH)
        deleted = await client.delete(f"/hospitals/batch/{BATCH}")
        again = await create(client, "A4", creation_batch_id=BATCH.upper())
    assert [h["id"] for h in listed.json()] == [2]
    assert refilled.status_code == 200
    assert deleted.json()["deleted_count"] == 2
    assert again.status_code == 200
    assert [h.name for h in fake.batch(BATCH)] == ["A4"]


@pytest.mark.parametrize("how", ["restart", "reset"])
async def test_a_restart_or_reset_empties_every_batch(how: str) -> None:
    fake = FakeDirectory(batch_cap=2)
    async with client_for(fake) as client:
        await create(client, "A1", creation_batch_id=BATCH)
        await create(client, "A2", creation_batch_id=BATCH)
        getattr(fake, how)()
        emptied = await client.get(f"/hospitals/batch/{BATCH}")
        after = [(await create(client, f"B{i}", creation_batch_id=BATCH)) for i in range(3)]
        listed = await client.get(f"/hospitals/batch/{BATCH}")
    assert emptied.status_code == 404
    assert [r.status_code for r in after] == [200, 200, 400]  # the cap counts afresh
    assert [(h["id"], h["name"]) for h in listed.json()] == [(1, "B0"), (2, "B1")]


async def test_batch_ids_in_any_uuid_spelling_name_one_batch(fake: FakeDirectory) -> None:
    spellings = [BATCH, BATCH.upper(), BATCH.replace("-", ""), f"{{{BATCH}}}"]
    async with client_for(fake) as client:
        created = [
            await create(client, f"H{i}", creation_batch_id=b) for i, b in enumerate(spellings)
        ]
        listed = [await client.get(f"/hospitals/batch/{b}") for b in spellings]
    assert {r.json()["creation_batch_id"] for r in created} == {BATCH}
    assert all(r.json() == listed[0].json() for r in listed)
    assert [h["name"] for h in listed[0].json()] == ["H0", "H1", "H2", "H3"]
    for spelling in (*spellings, uuid.UUID(BATCH)):
        assert [h.name for h in fake.batch(spelling)] == ["H0", "H1", "H2", "H3"]
    with pytest.raises(ValueError):
        fake.batch("not-a-uuid")


async def test_the_storage_cap_drops_the_oldest_across_gaps_and_restarts() -> None:
    fake = FakeDirectory(max_hospitals=3)
    async with client_for(fake) as client:
        for i in range(1, 6):
            await create(client, f"H{i}")  # 3, 4, 5 stay
        await client.delete("/hospitals/3")
        await client.delete("/hospitals/4")
        for i in range(6, 9):
            await create(client, f"H{i}")  # 5, 6, 7 fill up, 8 drops 5
        kept = [h.id for h in fake.hospitals]
        fake.restart()
        for i in range(1, 5):
            await create(client, f"R{i}")  # ids start over; 4 drops 1
    assert kept == [6, 7, 8]
    assert [h.id for h in fake.hospitals] == [2, 3, 4]


async def test_the_batch_index_agrees_with_the_storage_under_random_traffic() -> None:
    rng = random.Random(11)
    batches = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(4)]
    fake = FakeDirectory(max_hospitals=15, batch_cap=6, create_rate=None, other_rate=None)
    async with client_for(fake) as client:
        for step in range(400):
            batch = rng.choice(batches)
            draw = rng.random()
            if draw < 0.55:
                await create(client, f"H{step}", creation_batch_id=rng.choice([batch, None]))
            elif draw < 0.7:
                await client.delete(f"/hospitals/{rng.randint(1, 60)}")
            elif draw < 0.8:
                await client.delete(f"/hospitals/batch/{batch.upper()}")
            elif draw < 0.9:
                await client.patch(f"/hospitals/batch/{batch}/activate")
            elif draw < 0.92:
                fake.restart()
            else:
                listed = await client.get(f"/hospitals/batch/{batch}")
                expected = [h.to_dict() for h in fake.hospitals if h.creation_batch_id == batch]
                assert listed.json() == (expected or {"detail": EMPTY_BATCH})
            for b in batches:
                scanned = [h for h in fake.hospitals if h.creation_batch_id == b]
                assert fake.batch(b) == scanned, (step, b)


# ------------------------------------------------------------------------------------ rate limits


async def test_31st_create_in_a_window_is_429_until_the_window_passes(
    fake: FakeDirectory, clock: FakeClock
) -> None:
    async with client_for(fake) as client:
        statuses = [(await create(client, f"H{i}")).status_code for i in range(30)]
        clock.advance(30)
        limited = await create(client, "31st")
        clock.advance(29.9)
        still = await create(client, "still")
        clock.advance(0.1)
        fresh = await create(client, "fresh")
    assert statuses == [200] * 30
    for response in (limited, still):
        assert response.status_code == 429
        assert response.json() == {"error": "Rate limit exceeded: 30 per 1 minute"}
        assert "retry-after" not in response.headers
        assert not [h for h in response.headers if h.lower().startswith("x-ratelimit")]
    assert fresh.status_code == 200
    assert len(fake.hospitals) == 31
    assert [r.status for r in fake.creates()][-3:] == [429, 429, 200]


async def test_422_307_405_and_unknown_paths_do_not_count(clock: FakeClock) -> None:
    fake = FakeDirectory(clock=clock, create_rate=(2, 60.0), other_rate=(1, 60.0))
    async with client_for(fake) as client:
        for _ in range(5):
            assert (await client.post("/hospitals/", json={"name": ""})).status_code == 422
            assert (await client.post("/hospitals", json=row())).status_code == 307
            assert (await client.patch("/hospitals/")).status_code == 405
            assert (await client.get("/hospitals/abc")).status_code == 422
        statuses = [(await create(client, f"H{i}")).status_code for i in range(3)]
        listed = [(await client.get("/hospitals/")).status_code for _ in range(2)]
    assert statuses == [200, 200, 429]
    assert listed == [200, 429]


async def test_400_and_404_count(clock: FakeClock) -> None:
    fake = FakeDirectory(clock=clock, create_rate=(3, 60.0), other_rate=(2, 60.0), batch_cap=1)
    async with client_for(fake) as client:
        creates = [
            (await create(client, f"H{i}", creation_batch_id=BATCH)).status_code for i in range(4)
        ]
        gets = [(await client.get("/hospitals/99")).status_code for _ in range(3)]
    assert creates == [200, 400, 400, 429]
    assert gets == [404, 404, 429]


async def test_each_path_and_kind_has_its_own_budget(clock: FakeClock) -> None:
    fake = FakeDirectory(
        clock=clock, create_rate=(1, 60.0), other_rate=(1, 60.0), root_rate=(1, 60.0)
    )
    async with client_for(fake) as client:
        first = [
            (await create(client)).status_code,
            (await client.get("/hospitals/")).status_code,
            (await client.get("/hospitals/1")).status_code,
            (await client.put("/hospitals/2", json={})).status_code,
            (await client.get("/")).status_code,
        ]
        second = [
            (await create(client)).status_code,
            (await client.get("/hospitals/")).status_code,
            (await client.get("/hospitals/1")).status_code,
            # The same path, another method: the same "other" budget.
            (await client.delete("/hospitals/1")).status_code,
            (await client.get("/")).status_code,
        ]
    assert first == [200, 200, 200, 404, 200]
    assert second == [429, 429, 429, 429, 429]


async def test_client_addresses_have_separate_budgets(clock: FakeClock) -> None:
    fake = FakeDirectory(clock=clock, create_rate=(1, 60.0))
    async with client_for(fake, "127.0.0.1") as one, client_for(fake, "127.0.0.2") as two:
        statuses = [
            (await create(one)).status_code,
            (await create(one)).status_code,
            (await create(two)).status_code,
            (await create(two)).status_code,
        ]
    assert statuses == [200, 429, 200, 429]
    assert [r.client for r in fake.creates()] == ["127.0.0.1"] * 2 + ["127.0.0.2"] * 2


async def test_the_window_starts_at_the_first_counted_hit(clock: FakeClock) -> None:
    fake = FakeDirectory(clock=clock, create_rate=(2, 10.0))
    async with client_for(fake) as client:
        a = (await create(client)).status_code  # window opens at t
        clock.advance(6)
        b = (await create(client)).status_code
        clock.advance(3)
        c = (await create(client)).status_code  # t + 9: full
        clock.advance(1)
        d = (await create(client)).status_code  # t + 10: a new window
    assert [a, b, c, d] == [200, 200, 429, 200]


@pytest.mark.parametrize(
    ("rate", "text"),
    [
        ((30, 60.0), "30 per 1 minute"),
        ((5, 10.0), "5 per 10 second"),
        ((3, 120.0), "3 per 2 minute"),
        ((7, 3600.0), "7 per 1 hour"),
        ((2, 86400.0), "2 per 1 day"),
        ((4, 0.5), "4 per 0.5 second"),
        ((4, 90.0), "4 per 90 second"),
    ],
)
async def test_429_text_follows_the_setting(rate: tuple[int, float], text: str) -> None:
    fake = FakeDirectory(root_rate=rate)
    async with client_for(fake) as client:
        for _ in range(rate[0]):
            await client.get("/")
        response = await client.get("/")
    assert response.json() == {"error": f"Rate limit exceeded: {text}"}


async def test_rate_limits_can_be_disabled() -> None:
    fake = FakeDirectory(create_rate=None, other_rate=None, root_rate=None)
    async with client_for(fake) as client:
        statuses = {(await client.get("/")).status_code for _ in range(120)}
        statuses |= {(await create(client)).status_code for _ in range(40)}
    assert statuses == {200}


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigurationError):
        FakeDirectory(create_rate=(0, 60.0))
    with pytest.raises(ConfigurationError):
        FakeDirectory(other_rate=(5, 0.0))
    with pytest.raises(ConfigurationError):
        FakeDirectory(max_concurrent_creates=0)
    with pytest.raises(ConfigurationError):
        FakeDirectory(create_latency=-1)
    with pytest.raises(ConfigurationError):
        Faults(error_rate=0.6, timeout_after_commit_rate=0.6)
    with pytest.raises(ConfigurationError):
        Faults(error_rate=-0.1)
    with pytest.raises(ConfigurationError):
        Faults(routes=frozenset({"creates"}))


# -------------------------------------------------------------------------------- scripted faults


async def test_injected_error_is_503_html_and_stores_nothing(fake: FakeDirectory) -> None:
    fake.inject(Fault.ERROR)
    async with client_for(fake) as client:
        failed = await create(client)
        ok = await create(client)
    assert failed.status_code == 503
    assert failed.headers["content-type"].startswith("text/html")
    assert "<html>" in failed.text
    assert ok.status_code == 200
    assert [h.id for h in fake.hospitals] == [1]
    first = fake.creates()[0]
    assert (first.fault, first.status, first.committed) == ("error", 503, False)


async def test_injected_timeout_commits_then_the_client_times_out(fake: FakeDirectory) -> None:
    fake.inject("timeout_after_commit")
    async with client_for(fake) as client:
        with pytest.raises(httpx.ReadTimeout) as caught:
            await create(client, creation_batch_id=BATCH)
        assert caught.value.request.url.path == "/hospitals/"
        listed = await client.get(f"/hospitals/batch/{BATCH}")
    assert len(fake.hospitals) == 1
    assert listed.status_code == 200
    record = fake.creates()[0]
    assert (record.fault, record.status, record.committed) == ("timeout_after_commit", None, True)


async def test_injected_reset_commits_then_the_connection_breaks(fake: FakeDirectory) -> None:
    fake.inject(Fault.RESET_AFTER_COMMIT)
    async with client_for(fake) as client:
        with pytest.raises(httpx.ReadError, match="connection reset by peer") as caught:
            await create(client)
    assert caught.value.request.method == "POST"
    assert len(fake.hospitals) == 1
    assert fake.creates()[0].committed is True


async def test_injected_down_is_a_connect_error_and_stores_nothing(fake: FakeDirectory) -> None:
    fake.inject(Fault.DOWN, times=2)
    async with client_for(fake) as client:
        for _ in range(2):
            with pytest.raises(httpx.ConnectError) as caught:
                await create(client)
            assert caught.value.request is not None
        ok = await create(client)
    assert ok.status_code == 200
    assert len(fake.hospitals) == 1
    assert [(r.fault, r.status, r.committed) for r in fake.creates()] == [
        ("down", None, False),
        ("down", None, False),
        (None, 200, True),
    ]


async def test_injected_rate_limit_is_a_contract_429_that_does_not_count(
    clock: FakeClock,
) -> None:
    fake = FakeDirectory(clock=clock, create_rate=(1, 60.0))
    fake.inject(Fault.RATE_LIMIT)
    async with client_for(fake) as client:
        spurious = await create(client)
        counted = await create(client)
        real = await create(client)
    assert spurious.status_code == 429
    assert spurious.json() == {"error": "Rate limit exceeded: 1 per 1 minute"}
    assert "retry-after" not in spurious.headers
    assert counted.status_code == 200
    assert real.status_code == 429
    assert len(fake.hospitals) == 1


async def test_spurious_429_on_an_unlimited_route_uses_the_contract_text() -> None:
    fake = FakeDirectory(create_rate=None)
    fake.inject(Fault.RATE_LIMIT)
    async with client_for(fake) as client:
        response = await create(client)
    assert response.json() == {"error": "Rate limit exceeded: 30 per 1 minute"}


async def test_injected_timeout_on_activation_activates_the_batch(fake: FakeDirectory) -> None:
    async with client_for(fake) as client:
        await create(client, creation_batch_id=BATCH)
        fake.inject(Fault.TIMEOUT_AFTER_COMMIT, route="batch_activate")
        with pytest.raises(httpx.ReadTimeout):
            await client.patch(f"/hospitals/batch/{BATCH}/activate")
        again = await client.patch(f"/hospitals/batch/{BATCH}/activate")
    assert again.status_code == 400
    assert all(h.active for h in fake.batch(BATCH))


async def test_injected_reset_on_delete_deletes(fake: FakeDirectory) -> None:
    async with client_for(fake) as client:
        await create(client)
        fake.inject(Fault.RESET_AFTER_COMMIT, route="delete")
        with pytest.raises(httpx.ReadError):
            await client.delete("/hospitals/1")
    assert fake.hospitals == []


async def test_scripted_faults_match_their_route_only(fake: FakeDirectory) -> None:
    fake.inject(Fault.ERROR, route="create")
    async with client_for(fake) as client:
        listed = await client.get("/hospitals/")
        root = await client.get("/")
        created = await create(client)
    assert (listed.status_code, root.status_code, created.status_code) == (200, 200, 503)


async def test_a_scripted_fault_for_any_route(fake: FakeDirectory) -> None:
    fake.inject(Fault.ERROR, route=None, times=2)
    async with client_for(fake) as client:
        statuses = [
            (await client.get("/nowhere")).status_code,
            (await client.get("/")).status_code,
            (await client.get("/")).status_code,
        ]
    assert statuses == [503, 503, 200]


async def test_scripted_faults_come_in_order_and_before_random_ones() -> None:
    fake = FakeDirectory(faults=Faults(error_rate=1.0))
    fake.inject(Fault.RATE_LIMIT)
    fake.inject(Fault.DOWN)
    async with client_for(fake) as client:
        first = await create(client)
        with pytest.raises(httpx.ConnectError):
            await create(client)
        third = await create(client)
    assert first.status_code == 429
    assert third.status_code == 503
    assert [r.fault for r in fake.creates()] == ["rate_limit", "down", "error"]


def test_inject_checks_its_arguments(fake: FakeDirectory) -> None:
    with pytest.raises(ConfigurationError):
        fake.inject("explode")
    with pytest.raises(ConfigurationError):
        fake.inject(Fault.ERROR, route="creates")
    with pytest.raises(ConfigurationError):
        fake.inject(Fault.ERROR, times=0)


async def test_down_mode_fails_every_request_and_can_be_lifted(fake: FakeDirectory) -> None:
    fake.faults = Faults(down=True)
    async with client_for(fake) as client:
        for path in ("/", "/hospitals/", "/nowhere"):
            with pytest.raises(httpx.ConnectError):
                await client.get(path)
        with pytest.raises(httpx.ConnectError):
            await create(client)
        fake.faults = Faults()
        ok = await create(client)
    assert ok.status_code == 200
    assert len(fake.hospitals) == 1
    assert [r.fault for r in fake.requests] == ["down"] * 4 + [None]


# ----------------------------------------------------------------------------------- random faults


async def run_creates(fake: FakeDirectory, count: int) -> list[str]:
    """Send ``count`` creates one by one; return what the client saw for each."""
    seen: list[str] = []
    async with client_for(fake) as client:
        for i in range(count):
            try:
                response = await create(client, f"H{i}")
            except httpx.ConnectError:
                seen.append("connect_error")
            except httpx.ReadTimeout:
                seen.append("read_timeout")
            except httpx.ReadError:
                seen.append("read_error")
            else:
                seen.append(str(response.status_code))
    return seen


async def test_seeded_random_faults_have_the_documented_outcomes() -> None:
    faults = Faults(
        error_rate=0.2,
        timeout_after_commit_rate=0.2,
        reset_after_commit_rate=0.2,
        rate_limit_rate=0.2,
    )
    fake = FakeDirectory(faults=faults, create_rate=None, seed=20250920)
    seen = await run_creates(fake, 60)
    seed = f"seed={fake.seed}"
    expected = {
        "error": ("503", False),
        "timeout_after_commit": ("read_timeout", True),
        "reset_after_commit": ("read_error", True),
        "rate_limit": ("429", False),
        None: ("200", True),
    }
    records = fake.creates()
    assert len(records) == 60, seed
    for record, outcome in zip(records, seen, strict=True):
        assert (outcome, record.committed) == expected[record.fault], (seed, record)
    kinds = {record.fault for record in records}
    assert kinds == set(expected), (seed, kinds)
    committed = sum(r.committed for r in records)
    assert len(fake.hospitals) == committed, seed


async def test_the_same_seed_gives_the_same_schedule() -> None:
    faults = Faults(error_rate=0.3, reset_after_commit_rate=0.3)
    first = FakeDirectory(faults=faults, create_rate=None)
    schedule = await run_creates(first, 30)
    again = FakeDirectory(faults=faults, create_rate=None, seed=first.seed)
    assert await run_creates(again, 30) == schedule, f"seed={first.seed}"
    assert len(set(schedule)) > 1, f"seed={first.seed}: {schedule}"
    first.reset()
    assert await run_creates(first, 30) == schedule, f"seed={first.seed}"


async def test_random_faults_spare_reads_unless_their_routes_are_named() -> None:
    fake = FakeDirectory(faults=Faults(error_rate=1.0), other_rate=None, root_rate=None, seed=3)
    async with client_for(fake) as client:
        reads = {(await client.get("/hospitals/")).status_code for _ in range(5)}
        reads |= {(await client.get("/")).status_code for _ in range(5)}
        fake.faults = Faults(error_rate=1.0, routes=frozenset({"root"}))
        root = (await client.get("/")).status_code
        created = (await create(client)).status_code
    assert reads == {200}
    assert (root, created) == (503, 200)


async def test_random_timeouts_hit_updates_too() -> None:
    fake = FakeDirectory(faults=Faults(timeout_after_commit_rate=1.0), seed=4)
    async with client_for(fake) as client:
        with pytest.raises(httpx.ReadTimeout):
            await create(client)
        fake.faults = Faults()
        await create(client, "ok", creation_batch_id=BATCH)
        fake.faults = Faults(timeout_after_commit_rate=1.0)
        with pytest.raises(httpx.ReadTimeout):
            await client.put("/hospitals/2", json={"name": "renamed"})
    assert fake.hospital(2) is not None
    assert fake.hospital(2).name == "renamed"  # type: ignore[union-attr]


async def test_latency_jitter_adds_a_latency_phase() -> None:
    plain = FakeDirectory()
    jittery = FakeDirectory(faults=Faults(latency_jitter=0.02), seed=5)
    for fake in (plain, jittery):
        async with client_for(fake) as client:
            await create(client)
    assert plain.peak_creates_in_flight == 0
    assert jittery.peak_creates_in_flight == 1


def test_a_seed_is_picked_when_none_is_given() -> None:
    assert isinstance(FakeDirectory().seed, int)
    assert FakeDirectory(seed=42).seed == 42


def test_faults_round_trip_through_json() -> None:
    faults = Faults(error_rate=0.25, routes=frozenset({"create", "get"}), hang=2.0)
    data = json.loads(json.dumps(faults.to_dict()))
    assert data["routes"] == ["create", "get"]
    assert Faults.from_dict(data) == faults
    with pytest.raises(ConfigurationError):
        Faults.from_dict({"error_rat": 0.1})


# ------------------------------------------------------------------------------------ concurrency


async def test_concurrent_creates_never_exceed_the_concurrency_cap() -> None:
    fake = FakeDirectory(create_latency=0.05, max_concurrent_creates=5, create_rate=None)
    observed: list[int] = []
    async with client_for(fake) as client:

        async def watch() -> None:
            while True:
                observed.append(fake.creates_in_flight)
                await anyio.sleep(0.005)

        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            async with anyio.create_task_group() as senders:
                for i in range(20):
                    senders.start_soon(create, client, f"H{i}")
            tg.cancel_scope.cancel()
        elapsed = time.monotonic() - started
    assert len(fake.hospitals) == 20
    assert fake.peak_creates_in_flight == 5
    assert max(observed) <= 5
    assert fake.creates_in_flight == 0
    # Four waves of five, each at least one latency long.
    assert elapsed >= 4 * 0.05


async def test_creates_run_in_parallel_up_to_the_cap() -> None:
    fake = FakeDirectory(create_latency=0.1, create_rate=None)
    async with client_for(fake) as client:
        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(create, client, f"H{i}")
        elapsed = time.monotonic() - started
    assert fake.peak_creates_in_flight == 20
    assert elapsed < 1.0


async def test_a_restart_loses_creates_in_flight() -> None:
    fake = FakeDirectory(create_latency=0.2)
    async with client_for(fake) as client:
        outcome: list[BaseException] = []

        async def send() -> None:
            try:
                await create(client)
            except httpx.ReadError as exc:
                outcome.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(send)
            await anyio.sleep(0.05)
            assert fake.creates_in_flight == 1
            fake.restart()
        after = await create(client)
    assert len(outcome) == 1
    assert after.json()["id"] == 1
    assert [h.id for h in fake.hospitals] == [1]
    assert fake.creates()[0].committed is False


# ----------------------------------------------------------------------------------- request log


async def test_the_request_log_records_every_request(fake: FakeDirectory, clock: FakeClock) -> None:
    async with client_for(fake, "127.0.0.9") as client:
        await create(client, creation_batch_id=BATCH)
        clock.advance(1.5)
        await client.post("/hospitals", json=row())
        await client.post(
            "/hospitals/", content=b"{oops", headers={"content-type": "application/json"}
        )
        await client.get("/nowhere")
        await client.get("/hospitals/1")
    records = fake.requests
    assert all(isinstance(r, RecordedRequest) for r in records)
    assert records[0] == RecordedRequest(
        method="POST",
        path="/hospitals/",
        route="create",
        status=200,
        arrived_at=1000.0,
        client="127.0.0.9",
        body=row(creation_batch_id=BATCH),
        fault=None,
        committed=True,
    )
    assert [(r.method, r.path, r.route, r.status) for r in records[1:]] == [
        ("POST", "/hospitals", None, 307),
        ("POST", "/hospitals/", "create", 422),
        ("GET", "/nowhere", None, 404),
        ("GET", "/hospitals/1", "get", 200),
    ]
    assert [r.arrived_at for r in records[1:]] == [1001.5] * 4
    assert records[2].body == "{oops"
    assert records[3].body is None
    assert [r.committed for r in records[1:]] == [False] * 4
    assert len(fake.creates()) == 2


async def test_the_request_log_keeps_the_last_max_log_requests(clock: FakeClock) -> None:
    fake = FakeDirectory(clock=clock, max_log=3)
    async with client_for(fake) as client:
        for i in range(4):
            await create(client, f"H{i}")
            clock.advance(1.0)
        await client.get("/")
        state = (await client.get("/__fake__/state")).json()
    assert fake.max_log == 3
    assert [r.arrived_at for r in fake.requests] == [1002.0, 1003.0, 1004.0]
    assert [r.route for r in fake.requests] == ["create", "create", "root"]
    assert [r.body["name"] for r in fake.creates()] == ["H2", "H3"]  # type: ignore[index]
    assert fake.requests_dropped == 2
    assert len(fake.hospitals) == 4  # only the log is trimmed
    assert [r["arrived_at"] for r in state["requests"]] == [1002.0, 1003.0, 1004.0]
    assert state["requests_dropped"] == 2
    fake.reset()
    assert fake.requests == []
    assert fake.requests_dropped == 0


async def test_the_request_log_bound_is_generous_and_can_be_lifted() -> None:
    assert FakeDirectory().max_log == 100_000
    fake = FakeDirectory(max_log=None)
    async with client_for(fake) as client:
        for _ in range(5):
            await client.get("/")
    assert fake.max_log is None
    assert len(fake.requests) == 5
    assert fake.requests_dropped == 0
    with pytest.raises(ConfigurationError, match="max_log"):
        FakeDirectory(max_log=0)


async def test_a_request_dropped_from_the_log_still_completes() -> None:
    fake = FakeDirectory(create_latency=0.05, max_log=1)
    async with client_for(fake) as client:
        async with anyio.create_task_group() as tg:
            tg.start_soon(create, client, "slow")
            await anyio.sleep(0.01)
            await client.get("/")  # pushes the create in flight out of the log
        await client.get("/hospitals/1")
    assert [h.name for h in fake.hospitals] == ["slow"]
    assert [(r.route, r.status) for r in fake.requests] == [("get", 200)]
    assert fake.requests_dropped == 2


async def test_duplicates_groups_identical_hospitals(fake: FakeDirectory) -> None:
    async with client_for(fake) as client:
        await create(client, "A", creation_batch_id=BATCH)
        await create(client, "A", creation_batch_id=BATCH)
        await create(client, "A", creation_batch_id=OTHER_BATCH)
        await create(client, "B", creation_batch_id=BATCH)
    groups = fake.duplicates()
    assert [[h.id for h in group] for group in groups] == [[1, 2]]


async def test_reset_makes_the_fake_as_new(fake: FakeDirectory) -> None:
    fake.faults = Faults(error_rate=1.0)
    fake.inject(Fault.DOWN, route="get")
    async with client_for(fake) as client:
        await client.get("/")
        fake.reset()
        assert fake.requests == []
        assert fake.faults == Faults()
        got = await client.get("/hospitals/1")
        created = await create(client)
    assert got.status_code == 404  # the scripted DOWN is gone
    assert created.status_code == 200
    assert created.json()["id"] == 1


# ----------------------------------------------------------------------------- ASGI and control


async def test_the_asgi_app_serves_the_same_contract() -> None:
    fake = FakeDirectory()
    transport = httpx.ASGITransport(app=fake.app, client=("127.0.0.5", 4000))
    async with httpx.AsyncClient(transport=transport, base_url="http://asgi") as client:
        created = await create(client, creation_batch_id=BATCH)
        redirected = await client.post("/hospitals", json=row())
        fake.inject(Fault.DOWN, route="get")
        down = await client.get("/hospitals/1")
        fake.inject(Fault.RESET_AFTER_COMMIT, route="batch_activate")
        with pytest.raises(ConnectionResetError):
            await client.patch(f"/hospitals/batch/{BATCH}/activate")
    assert created.status_code == 200
    assert redirected.status_code == 307
    assert redirected.headers["location"] == "http://asgi/hospitals/"
    assert down.status_code == 502
    assert "<html>" in down.text
    assert fake.requests[0].client == "127.0.0.5"
    assert fake.requests[2].status == 502
    assert all(h.active for h in fake.hospitals)


async def test_control_endpoints(fake: FakeDirectory) -> None:
    async with client_for(fake) as client:
        await create(client)
        state = (await client.get("/__fake__/state")).json()
        put = await client.put("/__fake__/faults", json={"error_rate": 1.0, "routes": ["root"]})
        root = await client.get("/")
        await client.put("/__fake__/faults", json={})
        injected = await client.post("/__fake__/inject", json={"fault": "error"})
        failed = await create(client)
        bad = await client.post("/__fake__/inject", json={"fault": "nope"})
        bad_faults = await client.put("/__fake__/faults", json={"error_rate": 2})
        wrong_method = await client.get("/__fake__/reset")
        unknown = await client.get("/__fake__/nope")
        await client.post("/__fake__/restart")
        after_restart = await client.get("/hospitals/")
        before_reset = len(fake.requests)
        await client.post("/__fake__/reset")
    assert state["seed"] == 1
    assert state["hospitals"][0]["id"] == 1
    assert state["requests"][0]["route"] == "create"
    assert put.status_code == 200
    assert put.json()["routes"] == ["root"]
    assert put.json()["error_rate"] == 1.0
    assert root.status_code == 503
    assert injected.status_code == 200
    assert failed.status_code == 503
    assert bad.status_code == 400
    assert "unknown fault" in bad.json()["detail"]
    assert bad_faults.status_code == 400
    assert wrong_method.status_code == 405
    assert unknown.status_code == 404
    assert after_restart.json() == []
    # Control requests are not recorded: create, GET /, create, GET /hospitals/.
    assert before_reset == 4
    assert fake.requests == []


async def test_control_endpoints_are_not_rate_limited(clock: FakeClock) -> None:
    fake = FakeDirectory(clock=clock, other_rate=(1, 60.0))
    async with client_for(fake) as client:
        statuses = {(await client.get("/__fake__/state")).status_code for _ in range(5)}
    assert statuses == {200}


def test_public_surface() -> None:
    import hospital_bulk.testing as testing

    assert testing.__all__ == sorted(testing.__all__)
    assert set(testing.__all__) == {
        "FakeDirectory",
        "FakeServer",
        "Fault",
        "Faults",
        "RecordedRequest",
        "StoredHospital",
    }
    assert {f.value for f in Fault} == {
        "error",
        "timeout_after_commit",
        "reset_after_commit",
        "rate_limit",
        "down",
        "reject",
    }
    assert sys.modules["hospital_bulk.testing"] is testing


async def test_injected_reject_is_a_fastapi_422_that_stores_and_counts_nothing():
    fake = FakeDirectory(create_rate=(1, 60.0))
    fake.inject(Fault.REJECT)
    async with httpx.AsyncClient(transport=fake.transport(), base_url="http://fake") as client:
        refused = await client.post("/hospitals/", json={"name": "A", "address": "B"})
        accepted = await client.post("/hospitals/", json={"name": "A", "address": "B"})
    assert refused.status_code == 422
    assert refused.json()["detail"][0]["loc"] == ["body"]
    assert accepted.status_code == 200  # the refused create did not use the budget of 1
    assert [h.name for h in fake.hospitals] == ["A"]
    assert fake.requests[0].fault == "reject"
    assert fake.requests[0].committed is False
