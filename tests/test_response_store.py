"""The response store's bounds: count in all and per owner, bytes, age; and that an owner sees only its own."""

from config import StoreLimits
from sessions.serving.response_store import ResponseStore, StoredResponse


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def response(response_id: str, owner: str = "alice", text: str = "", tokens=(1, 2, 3)) -> StoredResponse:
    return StoredResponse.of(response_id, owner, "model", {"id": response_id}, [{"role": "user", "content": text}],
                             tokens, text)


def kept(store: ResponseStore, owner: str) -> list:
    """The ids of ``owner``'s responses the store still has (of those these tests make)."""
    return [f"{prefix}{index}" for prefix in "abc" for index in range(3)
            if store.get(f"{prefix}{index}", owner) is not None]


def test_the_oldest_go_first_past_the_count_and_past_an_owners_share():
    store = ResponseStore(StoreLimits(max_responses=4, max_per_owner=2))
    for index in range(3):
        assert store.put(response(f"a{index}"))
    assert kept(store, "alice") == ["a1", "a2"]  # an owner keeps its share, the rest's room stays the others'
    for index in range(3):
        store.put(response(f"b{index}", owner="bob"))
    assert kept(store, "bob") == ["b1", "b2"] and kept(store, "alice") == ["a1", "a2"]
    store.put(response("c0", owner="carol"))
    assert len(store) == 4 and kept(store, "alice") == ["a2"]


def test_an_owner_sees_and_deletes_only_its_own():
    store = ResponseStore()
    store.put(response("a0"))
    assert store.get("a0", "bob") is None and not store.delete("a0", "bob")
    assert store.get("a0", "alice").token_ids.tolist() == [1, 2, 3]
    assert store.delete("a0", "alice") and store.get("a0", "alice") is None


def test_bytes_bound_the_store_and_a_response_too_large_is_not_kept():
    one = response("x", text="t" * 100)
    store = ResponseStore(StoreLimits(max_bytes=int(one.size * 4.5)))
    for index in range(6):
        assert store.put(response(f"a{index}", text="t" * 100))
    assert len(store) == 4  # four fit in the bytes
    assert not store.put(response("huge", text="t" * one.size * 2))  # over a quarter of the store
    assert store.get("huge", "alice") is None and len(store) == 4


def test_responses_expire_and_a_store_of_none_keeps_nothing():
    clock = Clock()
    store = ResponseStore(StoreLimits(max_age=10), clock=clock)
    store.put(response("a0"))
    clock.now = 5
    store.put(response("a1"))
    clock.now = 11
    assert store.get("a0", "alice") is None and store.get("a1", "alice") is not None
    assert not ResponseStore(StoreLimits(max_responses=0)).put(response("a0"))
