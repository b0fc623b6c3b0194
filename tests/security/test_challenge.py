"""Challenges and answers: single use, fresh, signed by the registered key."""

from __future__ import annotations

import pickle

import pytest

from vela.security import Answer, ChallengeBook, Reason, Rejected, answer_challenge
from vela.security._codec import canonical


def rejected(reason, fn, *args, **kwargs):
    with pytest.raises(Rejected) as e:
        fn(*args, **kwargs)
    assert e.value.reason is reason, e.value


@pytest.fixture
def book():
    return ChallengeBook(server_id="srv", ttl_s=10)


def test_happy_path(book, clock, worker_a):
    ch = book.issue(hostname="a", build_id=7, now=clock.now)
    assert len(ch.nonce) == 43 and ch.server_id == "srv" and ch.build_id == 7
    ans = answer_challenge(ch, identity=worker_a, hostname="a", free_slots=2)
    clock.advance(1)
    assert book.consume(ch, ans, sign_public_key=worker_a.sign_public_key, now=clock.now) == 2


def test_nonces_are_fresh(book, clock):
    nonces = {book.issue(hostname="a", build_id=1, now=clock.now).nonce for _ in range(50)}
    assert len(nonces) == 50


def test_challenge_replayed_rejected(book, clock, worker_a):
    ch = book.issue(hostname="a", build_id=7, now=clock.now)
    ans = answer_challenge(ch, identity=worker_a, hostname="a", free_slots=1)
    book.consume(ch, ans, sign_public_key=worker_a.sign_public_key, now=clock.now)
    rejected(Reason.CHALLENGE_REPLAYED, book.consume, ch, ans,
             sign_public_key=worker_a.sign_public_key, now=clock.now)


def test_stale_challenge_rejected(book, clock, worker_a):
    ch = book.issue(hostname="a", build_id=7, now=clock.now)
    ans = answer_challenge(ch, identity=worker_a, hostname="a", free_slots=1)
    clock.advance(11)
    rejected(Reason.CHALLENGE_STALE, book.consume, ch, ans,
             sign_public_key=worker_a.sign_public_key, now=clock.now)


def test_answer_signed_by_another_key_rejected(book, clock, worker_a, worker_b):
    ch = book.issue(hostname="a", build_id=7, now=clock.now)
    ans = answer_challenge(ch, identity=worker_b, hostname="a", free_slots=1)
    rejected(Reason.ANSWER_BAD_SIGNATURE, book.consume, ch, ans,
             sign_public_key=worker_a.sign_public_key, now=clock.now)


def test_bad_answer_burns_the_challenge(book, clock, worker_a, worker_b):
    ch = book.issue(hostname="a", build_id=7, now=clock.now)
    bad = answer_challenge(ch, identity=worker_b, hostname="a", free_slots=1)
    rejected(Reason.ANSWER_BAD_SIGNATURE, book.consume, ch, bad,
             sign_public_key=worker_a.sign_public_key, now=clock.now)
    good = answer_challenge(ch, identity=worker_a, hostname="a", free_slots=1)
    rejected(Reason.CHALLENGE_REPLAYED, book.consume, ch, good,
             sign_public_key=worker_a.sign_public_key, now=clock.now)


def test_answer_for_another_nonce_rejected(book, clock, worker_a):
    first = book.issue(hostname="a", build_id=7, now=clock.now)
    second = book.issue(hostname="a", build_id=7, now=clock.now)
    ans = answer_challenge(first, identity=worker_a, hostname="a", free_slots=1)
    # As it is: the answer names another challenge.
    rejected(Reason.CHALLENGE_MISMATCH, book.consume, second, ans,
             sign_public_key=worker_a.sign_public_key, now=clock.now)
    # Relabelled with the second nonce: the signature does not cover it.
    third = book.issue(hostname="a", build_id=7, now=clock.now)
    relabelled = ans.model_copy(update={"nonce": third.nonce})
    rejected(Reason.ANSWER_BAD_SIGNATURE, book.consume, third, relabelled,
             sign_public_key=worker_a.sign_public_key, now=clock.now)


def test_altered_free_slots_rejected(book, clock, worker_a):
    ch = book.issue(hostname="a", build_id=7, now=clock.now)
    ans = answer_challenge(ch, identity=worker_a, hostname="a", free_slots=0)
    rejected(Reason.ANSWER_BAD_SIGNATURE, book.consume, ch,
             ans.model_copy(update={"free_slots": 9}),
             sign_public_key=worker_a.sign_public_key, now=clock.now)


def test_unknown_or_forged_challenge_rejected(book, clock, worker_a):
    ch = book.issue(hostname="a", build_id=7, now=clock.now)
    other_book = ChallengeBook(server_id="srv", ttl_s=10)
    foreign = other_book.issue(hostname="a", build_id=7, now=clock.now)
    ans = answer_challenge(foreign, identity=worker_a, hostname="a", free_slots=1)
    rejected(Reason.CHALLENGE_UNKNOWN, book.consume, foreign, ans,
             sign_public_key=worker_a.sign_public_key, now=clock.now)
    # Same nonce, different build: not the challenge that was issued.
    forged = ch.model_copy(update={"build_id": 8})
    ans = answer_challenge(forged, identity=worker_a, hostname="a", free_slots=1)
    rejected(Reason.CHALLENGE_UNKNOWN, book.consume, forged, ans,
             sign_public_key=worker_a.sign_public_key, now=clock.now)


def test_answer_from_another_worker_rejected(book, clock, worker_b):
    ch = book.issue(hostname="a", build_id=7, now=clock.now)
    ans = answer_challenge(ch, identity=worker_b, hostname="b", free_slots=1)
    rejected(Reason.WRONG_WORKER, book.consume, ch, ans,
             sign_public_key=worker_b.sign_public_key, now=clock.now)


def test_answer_is_domain_separated(worker_a, book, clock):
    """A signature over the bare challenge (another protocol) is not an answer."""
    ch = book.issue(hostname="a", build_id=7, now=clock.now)
    from vela.security._codec import b64u
    sig = b64u(worker_a.sign(canonical("vela-challenge-answer-v0", ch.model_dump())))
    ans = Answer(nonce=ch.nonce, hostname="a", free_slots=1, signature=sig)
    rejected(Reason.ANSWER_BAD_SIGNATURE, book.consume, ch, ans,
             sign_public_key=worker_a.sign_public_key, now=clock.now)


def test_spent_and_unanswered_challenges_leave_the_book_after_two_windows(book, clock,
                                                                         worker_a):
    old = [book.issue(hostname="a", build_id=i, now=clock.now) for i in range(3)]
    book.consume(old[0], answer_challenge(old[0], identity=worker_a, hostname="a",
                                          free_slots=1),
                 sign_public_key=worker_a.sign_public_key, now=clock.now)
    clock.advance(15)
    late = book.issue(hostname="a", build_id=9, now=clock.now)
    assert len(book) == 4  # within two windows: a late answer is told it is stale
    rejected(Reason.CHALLENGE_STALE, book.consume, old[1],
             answer_challenge(old[1], identity=worker_a, hostname="a", free_slots=1),
             sign_public_key=worker_a.sign_public_key, now=clock.now)
    clock.advance(6)
    book.issue(hostname="a", build_id=10, now=clock.now)
    assert len(book) == 2  # the first three are gone, the later two stay
    ans = answer_challenge(late, identity=worker_a, hostname="a", free_slots=1)
    assert book.consume(late, ans, sign_public_key=worker_a.sign_public_key,
                        now=clock.now) == 1


def test_book_is_bounded_and_wire_types_pickle(clock, worker_a):
    book = ChallengeBook(server_id="srv", ttl_s=10, max_outstanding=5)
    first = book.issue(hostname="a", build_id=1, now=clock.now)
    for _ in range(10):
        book.issue(hostname="a", build_id=1, now=clock.now)
    assert len(book) == 5
    ans = answer_challenge(first, identity=worker_a, hostname="a", free_slots=1)
    rejected(Reason.CHALLENGE_UNKNOWN, book.consume, first, ans,
             sign_public_key=worker_a.sign_public_key, now=clock.now)
    assert pickle.loads(pickle.dumps(ans)) == ans
    assert pickle.loads(pickle.dumps(first)) == first
