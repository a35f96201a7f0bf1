"""The client against the fake upstream, in process and served by uvicorn on loopback.

Every outcome class of the client is produced here by the fake's own behaviour or fault
switches, and every effect is checked at the fake (the source of truth).
"""

from __future__ import annotations

import uuid

import httpx
import pytest

from hospital_bulk import (
    AmbiguousOutcomeError,
    BatchAlreadyActiveError,
    BatchFullError,
    BatchNotFoundError,
    HospitalCreate,
    HospitalDirectoryClient,
    HospitalNotFoundError,
    HospitalUpdate,
    Outcome,
    RateLimitedError,
    RequestNotSentError,
    UpstreamValidationError,
)
from hospital_bulk.testing import FakeDirectory, FakeServer, Fault, Faults

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["in_process", "served"])
def mode(request):
    return request.param


@pytest.fixture
def fake():
    return FakeDirectory(create_rate=(5, 60.0), batch_cap=3)


@pytest.fixture
async def api(mode, fake):
    if mode == "in_process":
        async with HospitalDirectoryClient("http://fake", transport=fake.transport()) as client:
            yield client
    else:
        with FakeServer(fake) as server:
            async with HospitalDirectoryClient(server.url, timeout=0.5) as client:
                yield client


def new(batch: uuid.UUID | None, name: str = "St. Mary") -> HospitalCreate:
    return HospitalCreate(name=name, address="1 Main St", phone="555", creation_batch_id=batch)


async def test_the_bulk_workflow_end_to_end(api, fake):
    batch = uuid.uuid4()
    assert await api.health() is True
    assert await api.list_batch(batch) == []
    created = [await api.create_hospital(new(batch, f"H{i}")) for i in range(3)]
    assert [h.id for h in created] == [1, 2, 3]
    assert all(not h.active and h.creation_batch_id == batch for h in created)
    assert created[0].created_at.tzinfo is None
    listed = await api.list_batch(str(batch).upper())
    assert sorted(h.name for h in listed) == ["H0", "H1", "H2"]
    assert (await api.activate_batch(batch)).activated_count == 3
    assert all(h.active for h in fake.batch(batch))
    with pytest.raises(BatchAlreadyActiveError):
        await api.activate_batch(batch)
    assert (await api.delete_batch(batch)).deleted_count == 3
    assert fake.batch(batch) == []
    with pytest.raises(BatchNotFoundError):
        await api.delete_batch(batch)
    with pytest.raises(BatchNotFoundError):
        await api.activate_batch(batch)


async def test_single_hospital_endpoints(api, fake):
    hospital = await api.create_hospital(new(None))
    assert hospital.active is True
    assert (await api.get_hospital(hospital.id)).name == "St. Mary"
    updated = await api.update_hospital(hospital.id, HospitalUpdate(phone="999"))
    assert (updated.name, updated.phone) == ("St. Mary", "999")
    assert [h.id for h in await api.list_hospitals()] == [hospital.id]
    await api.delete_hospital(hospital.id)
    assert fake.hospitals == []
    with pytest.raises(HospitalNotFoundError) as info:
        await api.get_hospital(hospital.id)
    assert info.value.outcome is Outcome.REJECTED


async def test_rejected_batch_full(api, fake):
    batch = uuid.uuid4()
    for i in range(3):
        await api.create_hospital(new(batch, f"H{i}"))
    with pytest.raises(BatchFullError) as info:
        await api.create_hospital(new(batch, "H3"))
    assert info.value.outcome is Outcome.REJECTED
    assert len(fake.batch(batch)) == 3


async def test_rejected_validation_carries_the_422_list(api, fake):
    blank = HospitalCreate.model_construct(name="   ", address="1 Main St", phone=None)
    with pytest.raises(UpstreamValidationError) as info:
        await api.create_hospital(blank)
    assert info.value.status_code == 422
    assert isinstance(info.value.detail, list)
    assert info.value.detail[0]["loc"] == ["body", "name"]
    assert fake.hospitals == []


async def test_rate_limited_after_the_budget_with_the_window(api, fake):
    for i in range(5):
        await api.create_hospital(new(None, f"H{i}"))
    with pytest.raises(RateLimitedError) as info:
        await api.create_hospital(new(None, "H5"))
    err = info.value
    assert err.outcome is Outcome.RATE_LIMITED
    assert err.detail == "Rate limit exceeded: 5 per 1 minute"
    assert (err.retry_after, err.window) == (None, 60.0)
    assert len(fake.hospitals) == 5


async def test_a_spurious_429_is_rate_limited(api, fake):
    fake.inject(Fault.RATE_LIMIT)
    with pytest.raises(RateLimitedError):
        await api.create_hospital(new(None))
    assert fake.hospitals == []


async def test_error_before_commit_is_ambiguous_and_stores_nothing(api, fake):
    fake.inject(Fault.ERROR)
    with pytest.raises(AmbiguousOutcomeError) as info:
        await api.create_hospital(new(None))
    assert info.value.status_code == 503
    assert fake.hospitals == []


@pytest.mark.parametrize("fault", [Fault.TIMEOUT_AFTER_COMMIT, Fault.RESET_AFTER_COMMIT])
async def test_lost_answers_after_commit_are_ambiguous_and_the_hospital_exists(api, fake, fault):
    fake.faults = Faults(hang=3.0)
    fake.inject(fault)
    with pytest.raises(AmbiguousOutcomeError) as info:
        await api.create_hospital(new(None))
    assert info.value.outcome is Outcome.AMBIGUOUS
    assert info.value.status_code is None
    assert [h.name for h in fake.hospitals] == ["St. Mary"]
    assert fake.requests[-1].committed is True


async def test_ambiguous_activation_really_activated(api, fake):
    batch = uuid.uuid4()
    await api.create_hospital(new(batch))
    fake.faults = Faults(hang=3.0)
    fake.inject(Fault.TIMEOUT_AFTER_COMMIT, route="batch_activate")
    with pytest.raises(AmbiguousOutcomeError):
        await api.activate_batch(batch)
    assert all(h.active for h in await api.list_batch(batch))


async def test_down(api, fake, mode):
    fake.faults = Faults(down=True)
    if mode == "in_process":
        with pytest.raises(RequestNotSentError) as info:
            await api.create_hospital(new(None))
        assert info.value.outcome is Outcome.NOT_SENT
    else:
        # Served, the hosting proxy answers for the unreachable service.
        with pytest.raises(AmbiguousOutcomeError) as info:
            await api.create_hospital(new(None))
        assert info.value.status_code == 502
    assert fake.hospitals == []


async def test_nothing_listening_is_not_sent():
    with FakeServer() as server:
        url = server.url
    async with HospitalDirectoryClient(url, connect_timeout=2.0) as api:
        with pytest.raises(RequestNotSentError) as info:
            await api.health()
    assert isinstance(info.value.__cause__, httpx.ConnectError)


async def test_seeded_random_faults_only_ever_produce_documented_outcomes(mode):
    seed = 20261130
    fake = FakeDirectory(
        create_rate=None,
        seed=seed,
        faults=Faults(
            error_rate=0.2,
            timeout_after_commit_rate=0.2,
            reset_after_commit_rate=0.2,
            rate_limit_rate=0.2,
            hang=3.0,
        ),
    )
    seen: dict[Outcome, int] = {}

    async def run(client: HospitalDirectoryClient) -> None:
        for i in range(30):
            try:
                await client.create_hospital(new(None, f"H{i}"))
                outcome = Outcome.APPLIED
            except (AmbiguousOutcomeError, RateLimitedError) as exc:
                outcome = exc.outcome
            seen[outcome] = seen.get(outcome, 0) + 1

    if mode == "in_process":
        async with HospitalDirectoryClient("http://fake", transport=fake.transport()) as c:
            await run(c)
    else:
        with FakeServer(fake) as server:
            async with HospitalDirectoryClient(server.url, timeout=0.25) as c:
                await run(c)
    assert set(seen) == {Outcome.APPLIED, Outcome.AMBIGUOUS, Outcome.RATE_LIMITED}, (
        f"seed={seed}: {seen}"
    )
    committed = sum(r.committed for r in fake.requests)
    assert len(fake.hospitals) == committed, f"seed={seed}"
    assert seen[Outcome.APPLIED] == sum(
        1 for r in fake.requests if r.committed and r.fault is None
    ), f"seed={seed}"
