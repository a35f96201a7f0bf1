"""The Hospital Directory API's own data: what is sent and what comes back.

The models follow the upstream contract exactly: `created_at` is naive (the upstream sends no
time zone), batch ids are `uuid.UUID` so that they compare case-insensitively, unknown fields in
responses are ignored, and request bodies carry only the fields the upstream knows.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated
from uuid import UUID

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

__all__ = [
    "BatchActivation",
    "BatchDeletion",
    "Hospital",
    "HospitalCreate",
    "HospitalUpdate",
]


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must contain at least one character that is not white space")
    return value


def _naive(value: dt.datetime) -> dt.datetime:
    # The upstream sends naive timestamps; should a deployment ever add a zone, keep the
    # library's promise of naive values by converting to UTC first.
    if value.tzinfo is not None:
        return value.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return value


_Text = Annotated[str, Field(min_length=1), AfterValidator(_not_blank)]
_NaiveDatetime = Annotated[dt.datetime, AfterValidator(_naive)]


class HospitalCreate(BaseModel):
    """The body of a create (`POST /hospitals/`).

    Attributes:
        name: The hospital's name; at least one character that is not white space.
        address: The hospital's address; the same rule.
        phone: A phone number in any format, or ``None``.
        creation_batch_id: The batch the hospital joins (it is then created inactive), or
            ``None`` for a hospital that is active at once.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: _Text
    address: _Text
    phone: str | None = None
    creation_batch_id: UUID | None = None


class HospitalUpdate(BaseModel):
    """The body of an update (`PUT /hospitals/{id}`); fields left ``None`` are not changed.

    Attributes:
        name: A new name, or ``None`` to keep it.
        address: A new address, or ``None`` to keep it.
        phone: A new phone number, or ``None`` to keep it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: _Text | None = None
    address: _Text | None = None
    phone: str | None = None


class Hospital(BaseModel):
    """A hospital as the upstream returns it.

    Attributes:
        id: The upstream's id. Not durable: the upstream restarts its counter at 1 when it
            restarts, so never use it as a key across runs.
        name: The name.
        address: The address.
        phone: The phone number, or ``None``.
        creation_batch_id: The batch the hospital was created in, or ``None``.
        active: Whether the hospital is active (batched hospitals start inactive).
        created_at: When the upstream created it, naive (the upstream's own clock).
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: int
    name: str
    address: str
    phone: str | None = None
    creation_batch_id: UUID | None = None
    active: bool
    created_at: _NaiveDatetime


class BatchActivation(BaseModel):
    """The upstream's answer to a batch activation.

    Attributes:
        activated_count: How many hospitals were activated.
        message: The upstream's message.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    activated_count: int
    message: str = ""


class BatchDeletion(BaseModel):
    """The upstream's answer to a batch deletion.

    Attributes:
        deleted_count: How many hospitals were deleted.
        message: The upstream's message.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    deleted_count: int
    message: str = ""
