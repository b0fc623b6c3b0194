"""Challenges: the server asks a worker to prove, right now, that it holds its key.

A challenge is ``{nonce (32 random bytes), server_id, build_id, issued_at,
purpose}``; the answer is the worker's Ed25519 signature over canonical bytes
of the challenge plus its hostname and free slots. The server keeps every
challenge it issued in a :class:`ChallengeBook`; each is answerable once,
within ``ttl_s``, by the registered key of the worker it was issued to.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from vela.security._codec import b64u, canonical, timestamp
from vela.security.errors import Reason, Rejected
from vela.security.keys import same, verify_signature

if TYPE_CHECKING:
    from vela.security.identity import WorkerIdentity

NONCE_BYTES = 32
_ANSWER_DOMAIN = "vela-challenge-answer-v1"


class Purpose(StrEnum):
    DISPATCH = "dispatch"      # "may I send you build N?"
    REREGISTER = "reregister"  # a known worker proves itself after a restart


class Challenge(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    nonce: str = Field(min_length=43, max_length=43)
    server_id: str
    build_id: int | None
    issued_at_ms: int
    purpose: Purpose


class Answer(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    nonce: str = Field(max_length=64)
    hostname: str = Field(max_length=253)
    free_slots: int = Field(ge=0)
    signature: str = Field(max_length=128, repr=False)


def _signed_bytes(challenge: Challenge, hostname: str, free_slots: int) -> bytes:
    return canonical(_ANSWER_DOMAIN, {"challenge": challenge.model_dump(mode="json"),
                                      "hostname": hostname, "free_slots": free_slots})


def answer_challenge(challenge: Challenge, *, identity: WorkerIdentity, hostname: str,
                     free_slots: int) -> Answer:
    """Worker side: sign the challenge with the worker's key."""
    sig = identity.sign(_signed_bytes(challenge, hostname, free_slots))
    return Answer(nonce=challenge.nonce, hostname=hostname, free_slots=free_slots,
                  signature=b64u(sig))


@dataclass
class _Entry:
    challenge: Challenge
    hostname: str
    answered: bool = False


class ChallengeBook:
    """Server side: the outstanding challenges, in memory (a restart voids them,
    which only costs a new challenge)."""

    def __init__(self, *, server_id: str, ttl_s: float, max_outstanding: int = 10_000) -> None:
        self.server_id = server_id
        self.ttl_s = ttl_s
        self.max_outstanding = max_outstanding
        self._entries: dict[str, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def issue(self, *, hostname: str, build_id: int | None, now: datetime,
              purpose: Purpose = Purpose.DISPATCH) -> Challenge:
        self._purge(now)
        while len(self._entries) >= self.max_outstanding:
            # Oldest first: its late answer becomes challenge_unknown (fail closed).
            del self._entries[next(iter(self._entries))]
        challenge = Challenge(nonce=b64u(os.urandom(NONCE_BYTES)), server_id=self.server_id,
                              build_id=build_id, issued_at_ms=int(timestamp(now) * 1000),
                              purpose=Purpose(purpose))
        self._entries[challenge.nonce] = _Entry(challenge, hostname)
        return challenge

    def consume(self, challenge: Challenge, answer: Answer, *, sign_public_key: str,
                now: datetime) -> int:
        """Check ``answer`` to ``challenge``; returns the worker's free slots.

        The challenge is spent by the first attempt, good or bad, so a wrong
        answer cannot be retried against it.
        """
        entry = self._entries.get(challenge.nonce)
        if entry is None or entry.challenge != challenge:
            raise Rejected(Reason.CHALLENGE_UNKNOWN)
        if entry.answered:
            raise Rejected(Reason.CHALLENGE_REPLAYED)
        entry.answered = True
        if timestamp(now) * 1000 - challenge.issued_at_ms > self.ttl_s * 1000:
            raise Rejected(Reason.CHALLENGE_STALE)
        if not same(answer.nonce, challenge.nonce):
            raise Rejected(Reason.CHALLENGE_MISMATCH)
        if answer.hostname != entry.hostname:
            raise Rejected(Reason.WRONG_WORKER, f"challenge was issued to {entry.hostname}")
        signed = _signed_bytes(challenge, answer.hostname, answer.free_slots)
        if not verify_signature(sign_public_key, signed, answer.signature):
            raise Rejected(Reason.ANSWER_BAD_SIGNATURE, f"worker {entry.hostname}")
        return answer.free_slots

    def _purge(self, now: datetime) -> None:
        # Kept for two windows so a late answer is reported stale, not unknown. Entries
        # are in issue order, so only the expired head is looked at, not every entry
        # (after a clock step back, an entry may outlive its window behind a newer one:
        # max_outstanding still bounds the book).
        horizon = timestamp(now) * 1000 - 2 * self.ttl_s * 1000
        while self._entries:
            nonce, oldest = next(iter(self._entries.items()))
            if oldest.challenge.issued_at_ms >= horizon:
                break
            del self._entries[nonce]
