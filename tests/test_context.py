"""The end-user context: validation, the plugin-compatible functions, isolation."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

import deepsec
from concurrency_support import run_threads
from deepsec import EndUserContext, IdentityError
from deepsec.context import activate, current_context, deactivate


def test_token_and_local_identities_round_trip_unchanged():
    with deepsec.end_user("tok.en.x"):
        assert deepsec.get_end_user_identity() == "tok.en.x"
    with deepsec.end_user(("bob", None)):
        # The reference plugin stored JSON and handed back a list (defect 3).
        assert deepsec.get_end_user_identity() == ("bob", None)
        assert isinstance(deepsec.get_end_user_identity(), tuple)
    assert deepsec.get_end_user_identity() is None


def test_list_of_two_is_accepted_as_a_local_user():
    assert EndUserContext(["carol", "k1"]).identity == ("carol", "k1")


@pytest.mark.parametrize(
    ("value", "error", "text"),
    [
        ("", IdentityError, "non-empty"),
        ("   ", IdentityError, "non-empty"),
        (42, TypeError, "not int"),
        (b"tok", TypeError, "not bytes"),
        (("bob",), IdentityError, "got 1 items"),
        (("bob", None, "x"), IdentityError, "got 3 items"),
        (("", None), IdentityError, "name must be a non-empty"),
        ((1, None), TypeError, "name must be a str"),
        (("bob", 5), TypeError, "key must be a str or None"),
        (("bob", ""), IdentityError, "key must be a non-empty"),
        ("x" * 70000, IdentityError, "limit is 65535"),
    ],
)
def test_bad_identities_name_the_problem(value, error, text):
    with pytest.raises(error, match=text):
        deepsec.set_end_user_identity(value)
    with pytest.raises(error, match=text):
        deepsec.end_user(value)


def test_bad_identity_message_never_contains_the_value():
    secret = "sekrit-token-value"
    with pytest.raises(IdentityError) as info:
        deepsec.end_user((secret, ""))
    assert secret not in str(info.value)


@pytest.mark.parametrize(
    ("roles", "error"),
    [("admin", TypeError), ([1], TypeError), ([""], IdentityError), ({"a": 1}, TypeError)],
)
def test_bad_data_roles(roles, error):
    with pytest.raises(error, match="data_roles"):
        deepsec.set_end_user_data_roles(roles)


def test_bad_attributes():
    with pytest.raises(TypeError, match="attributes must be a dict"):
        deepsec.set_end_user_attributes(["a"])
    with pytest.raises(TypeError, match="not JSON-compatible"):
        deepsec.set_end_user_attributes({"a": object()})
    with pytest.raises(IdentityError, match="attribute names"):
        deepsec.set_end_user_attributes({"": 1})


@pytest.mark.parametrize(
    "attributes",
    [
        {"x": {1: "a"}},  # JSON would make it "1": one cache key with {"1": "a"}
        {"x": {True: "a"}},
        {"x": {1: "a", "b": 2}},  # mixed key types: sort_keys raised a bare TypeError
        {"x": [{"ok": 1}, {2: "deep"}]},
        {"x": ({None: 1},)},
    ],
)
def test_attribute_mappings_need_str_keys_at_every_level(attributes):
    with pytest.raises(IdentityError, match="keys must be strings at every level"):
        EndUserContext("tok", attributes=attributes)


def test_attributes_are_normalised_and_compared_type_strictly():
    # Tuples become lists (what JSON and the database give back): one form.
    ctx = EndUserContext("tok", attributes={"x": (1, (2, 3)), "m": {"k": (4,)}})
    assert dict(ctx.attributes) == {"x": [1, [2, 3]], "m": {"k": [4]}}
    assert ctx == EndUserContext("tok", attributes={"x": [1, [2, 3]], "m": {"k": [4]}})
    # True == 1 == 1.0 in Python, but the database sees true, 1 and 1.0.
    flags = [True, 1, 1.0]
    for i, a in enumerate(flags):
        for j, b in enumerate(flags):
            same = EndUserContext("tok", attributes={"c": a}) == EndUserContext(
                "tok", attributes={"c": b}
            )
            assert same is (i == j), (a, b)
    nested = EndUserContext("tok", attributes={"c": {"d": [True]}})
    assert nested != EndUserContext("tok", attributes={"c": {"d": [1]}})
    assert nested == EndUserContext("tok", attributes={"c": {"d": [True]}})
    assert EndUserContext("tok", attributes={"c": 1}) != EndUserContext("tok")


def test_data_roles_with_local_user_rejected_before_any_round_trip():
    with pytest.raises(IdentityError, match="local"):
        deepsec.end_user(("bob", None), data_roles=["hr"])
    with deepsec.end_user(None, data_roles=["hr"]), pytest.raises(IdentityError):
        deepsec.set_end_user_identity(("bob", None))


def test_setters_getters_and_copies():
    with deepsec.end_user(None):
        deepsec.set_end_user_identity("t1")
        deepsec.set_end_user_data_roles(["r1", "r2"])
        attrs = {"dept": "hr", "levels": [1, 2]}
        deepsec.set_end_user_attributes(attrs)
        attrs["dept"] = "changed"  # the stored copy is not affected
        assert deepsec.get_end_user_data_roles() == ["r1", "r2"]
        got = deepsec.get_end_user_attributes()
        assert got == {"dept": "hr", "levels": [1, 2]}
        got["levels"].append(3)
        assert deepsec.get_end_user_attributes() == {"dept": "hr", "levels": [1, 2]}
        deepsec.set_end_user_identity(None)
        assert deepsec.current_end_user() is None
    assert deepsec.get_end_user_data_roles() is None


def test_context_is_immutable_and_repr_hides_secrets():
    ctx = EndUserContext("header.payload.signature", ["r"], {"a": 1})
    with pytest.raises(AttributeError):
        ctx.identity = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        ctx.attributes["a"] = 2  # type: ignore[index]
    assert "payload" not in repr(ctx)
    assert "key-secret" not in repr(EndUserContext(("bob", "key-secret")))
    assert ctx == EndUserContext("header.payload.signature", ("r",), {"a": 1})
    assert ctx != EndUserContext("header.payload.signature", ("r",), {"a": 2})


def test_end_user_restores_previous_state_on_exit_and_exception():
    with deepsec.end_user("outer"):
        with pytest.raises(RuntimeError), deepsec.end_user("inner"):
            assert deepsec.get_end_user_identity() == "inner"
            raise RuntimeError
        assert deepsec.get_end_user_identity() == "outer"
        with deepsec.end_user(None):
            assert deepsec.current_end_user() is None
        assert deepsec.current_end_user() == EndUserContext("outer")
    assert deepsec.current_end_user() is None


def test_activate_and_deactivate():
    token = activate(EndUserContext("abc"))
    try:
        assert current_context().identity == "abc"
    finally:
        deactivate(token)
    assert current_context().identity is None
    with pytest.raises(TypeError):
        activate("abc")  # type: ignore[arg-type]


def test_threads_are_isolated():
    seen: dict[str, object] = {}
    barrier = threading.Barrier(8)

    def worker(name: str) -> None:
        deepsec.set_end_user_identity((name, None))
        barrier.wait()
        seen[name] = deepsec.get_end_user_identity()

    run_threads(worker, each=[f"u{i}" for i in range(8)], timeout=10)
    assert seen == {f"u{i}": (f"u{i}", None) for i in range(8)}
    assert deepsec.get_end_user_identity() is None


def test_asyncio_tasks_are_isolated():
    async def request(name: str) -> object:
        async with deepsec.end_user((name, None)):
            await asyncio.sleep(0.01)
            return deepsec.get_end_user_identity()

    async def main() -> list[object]:
        return await asyncio.gather(*(request(f"u{i}") for i in range(20)))

    assert asyncio.run(main()) == [(f"u{i}", None) for i in range(20)]


def test_work_that_outlives_its_activation_has_no_end_user():
    """Tasks and threads copy the contextvar; ending the request must reach them."""
    from deepsec.context import activate, deactivate

    async def main() -> list[object]:
        release = asyncio.Event()
        seen: list[object] = []

        async def background() -> None:
            seen.append(deepsec.get_end_user_identity())  # during the request
            await release.wait()
            seen.append(deepsec.get_end_user_identity())  # after it ended
            seen.append(deepsec.current_end_user())

        activation = activate(EndUserContext("req-token"))
        task = asyncio.create_task(background())
        await asyncio.sleep(0)
        deactivate(activation)
        release.set()
        await task
        return seen

    assert asyncio.run(main()) == ["req-token", None, None]


def test_setters_inside_a_request_end_with_it_and_work_after_it():
    from deepsec.context import activate, deactivate

    async def main() -> tuple[object, object, object]:
        release = asyncio.Event()
        results: list[object] = []

        async def background() -> None:
            await release.wait()
            results.append(deepsec.get_end_user_identity())
            deepsec.set_end_user_identity("later-token")  # a fresh, unscoped value
            results.append(deepsec.get_end_user_identity())

        activation = activate(None)
        deepsec.set_end_user_identity("in-request")  # same lease as the request
        deepsec.set_end_user_attributes({"a": 1})  # derived twice: still that lease
        task = asyncio.create_task(background())
        await asyncio.sleep(0)
        inside = deepsec.get_end_user_identity()
        deactivate(activation)
        release.set()
        await task
        return inside, results[0], results[1]

    assert asyncio.run(main()) == ("in-request", None, "later-token")


def test_to_thread_copies_end_with_the_block():
    async def main() -> list[object]:
        gate = threading.Event()
        out: list[object] = []

        def work() -> None:
            out.append(deepsec.get_end_user_identity())
            gate.wait(5)
            out.append(deepsec.get_end_user_identity())

        async with deepsec.end_user(("zoe", None)):
            fut = asyncio.ensure_future(asyncio.to_thread(work))
            # The block ends only once the thread has read inside it (a fixed
            # sleep ended it first when a loaded machine started the thread late).
            deadline = time.monotonic() + 5
            while not out and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
        gate.set()
        await fut
        return out

    assert asyncio.run(main()) == [("zoe", None), None]


def test_one_end_user_object_scopes_one_block_at_a_time():
    scope = deepsec.end_user(("vic", None))
    with scope:
        with pytest.raises(RuntimeError, match="already in use"), scope:
            pass
        assert deepsec.get_end_user_identity() == ("vic", None)
    with scope:  # free again once the block has ended
        assert deepsec.get_end_user_identity() == ("vic", None)
    assert deepsec.get_end_user_identity() is None


def test_a_setter_racing_the_end_of_its_request_does_not_keep_the_identity(monkeypatch):
    """The request ends while a spawned thread's setter is building its value.

    Deterministic: the context's ``replace`` (the slow, validating step)
    ends the request before it returns, as a preempted thread would see.
    """
    import contextvars

    from deepsec.context import get_end_user_identity, set_end_user_attributes

    act = activate(EndUserContext("tok.a.b"))
    original = EndUserContext.replace

    def replace_then_request_ends(self, **changes):
        new = original(self, **changes)
        ender = threading.Thread(target=act.end)
        ender.start()
        ender.join()
        return new

    seen: list[object] = []

    def worker() -> None:
        set_end_user_attributes({"k": 1})
        seen.append(get_end_user_identity())

    monkeypatch.setattr(EndUserContext, "replace", replace_then_request_ends)
    thread = threading.Thread(target=contextvars.copy_context().run, args=(worker,))
    thread.start()
    thread.join()
    assert seen == [None]


def test_setters_in_many_threads_all_end_with_the_request():
    """Children created from many threads at once are all ended (none lost)."""
    import contextvars

    from deepsec.context import get_end_user_identity, set_end_user_data_roles

    for _ in range(20):
        act = activate(EndUserContext("tok.a.b"))
        barrier = threading.Barrier(8)
        ended = threading.Event()
        seen: list[object] = []

        def worker(barrier=barrier, ended=ended, seen=seen) -> None:
            barrier.wait()
            set_end_user_data_roles(["r"])
            ended.wait()
            seen.append(get_end_user_identity())

        threads = [
            threading.Thread(target=contextvars.copy_context().run, args=(worker,))
            for _ in range(8)
        ]
        for t in threads:
            t.start()
        act.end()
        ended.set()
        for t in threads:
            t.join()
        assert seen == [None] * 8


def test_a_reused_end_user_object_does_not_revive_its_first_blocks_copies():
    """The object is its first block's lease: a later block must get a new one.

    A copy of the first block's context (a task or thread that outlived it)
    holds the object itself; were the second block to reactivate it, that
    work would run as the end user again.
    """
    import contextvars

    scope = deepsec.end_user("tok.reuse.x")
    with scope:
        outlived = contextvars.copy_context()
    assert outlived.run(deepsec.get_end_user_identity) is None
    with scope:
        assert deepsec.get_end_user_identity() == "tok.reuse.x"
        assert outlived.run(deepsec.get_end_user_identity) is None
        inner = contextvars.copy_context()
    assert inner.run(deepsec.get_end_user_identity) is None
    assert deepsec.get_end_user_identity() is None


def test_equal_tokens_share_one_validated_context_and_the_memo_is_bounded(monkeypatch):
    from deepsec import _end_user_context as context_module

    monkeypatch.setattr(context_module, "_TOKEN_CONTEXTS_KEPT", 3)
    context_module.forget_token_contexts()
    first = deepsec.end_user("tok.memo.a").context
    again = deepsec.end_user("".join(["tok.memo.", "a"])).context  # an equal, new str
    assert again is first
    for token in ("tok.memo.b", "tok.memo.c", "tok.memo.d"):
        deepsec.end_user(token)
    assert len(context_module._token_contexts) == 3
    assert "tok.memo.a" not in context_module._token_contexts  # the oldest went first
    # Invalid tokens raise every time and are never remembered.
    for _ in range(2):
        with pytest.raises(IdentityError):
            deepsec.end_user("   ")
    assert "   " not in context_module._token_contexts
    # Oversized tokens are validated every time, not kept.
    big = "t" * (context_module._TOKEN_CONTEXT_MAX_LEN + 1)
    assert deepsec.end_user(big).context is not deepsec.end_user(big).context
    # Non-ASCII tokens are validated every time, not kept (the bound is in bytes).
    wide = "tok.\u00e9.x"
    assert deepsec.end_user(wide).context is not deepsec.end_user(wide).context
    # With roles or attributes the context is the caller's own, never shared.
    assert deepsec.end_user("tok.memo.d", data_roles=["r"]).context.data_roles == ("r",)
    context_module.forget_token_contexts()


def test_a_str_subclass_token_is_never_looked_up_in_the_memo():
    """A subclass could answer == (and hash) like another user's token."""
    from deepsec import _end_user_context as context_module

    victim = deepsec.end_user("tok.victim.x").context

    class Sneaky(str):
        def __eq__(self, other: object) -> bool:
            return True

        def __hash__(self) -> int:
            return hash("tok.victim.x")

    sneaky = deepsec.end_user(Sneaky("tok.attacker.x")).context
    assert sneaky is not victim
    assert str.__eq__(sneaky.identity, "tok.attacker.x")
    assert not any(type(k) is not str for k in context_module._token_contexts)


def test_str_subclass_identities_become_plain_strings():
    """The prepared-context caches key by identity: a subclass must not answer for another."""

    class Sneaky(str):
        def __eq__(self, other: object) -> bool:
            return True

        def __hash__(self) -> int:
            return 0

    token = EndUserContext(Sneaky("tok.a.b")).identity
    local = EndUserContext((Sneaky("ann"), Sneaky("k"))).identity
    assert type(token) is str and str.__eq__(token, "tok.a.b")
    assert isinstance(local, tuple) and all(type(part) is str for part in local)
    assert local == ("ann", "k")


def test_new_activation_sets_every_field_and_a_bare_class_call_is_no_activation():
    """new_activation is the one constructor: every slot set, current or not; a
    class call with a context is refused, and one without sets nothing."""
    from deepsec.context import Activation, _current, new_activation

    slots = {name for cls in Activation.__mro__ for name in getattr(cls, "__slots__", ())}
    ctx = deepsec.EndUserContext("tok.new.activation")
    for current in (True, False):
        activation = new_activation(ctx, current=current)
        assert {name: hasattr(activation, name) for name in slots} == dict.fromkeys(slots, True)
        assert (_current.get() is activation) is current
        activation.end()
        assert not activation.active and _current.get() is not activation
    with pytest.raises(TypeError, match="takes no arguments"):
        Activation(ctx)  # type: ignore[call-arg]
    # A bare class call (what new_activation() starts from) makes nothing
    # current and sets no field; its repr still works.
    bare = Activation()
    assert not any(hasattr(bare, name) for name in slots)
    assert repr(bare) == "<deepsec Activation ended>"
    with pytest.raises(AttributeError):
        bare.end()  # (documented: only new_activation() makes a usable one)


def test_a_lease_class_with_an_init_or_new_of_its_own_is_refused():
    """new_activation() calls the class: a subclass with an __init__ or __new__ of
    its own or a mixin's is refused when the class is made (it would run, or fail,
    on every request), and end_user (made by its own __init__) is refused by it."""
    from deepsec.context import Activation, _current, new_activation

    with pytest.raises(TypeError, match="__init__ or __new__"):

        class _Lease(Activation):
            __slots__ = ("extra",)

            def __init__(self) -> None:
                self.extra = 1

    class _Mixin:
        def __init__(self, tag: str) -> None:
            self.tag = tag

    class _Maker:
        def __new__(cls) -> Any:
            return super().__new__(cls)

    for base in (_Mixin, _Maker):
        with pytest.raises(TypeError, match="__init__ or __new__"):
            type("_Mixed", (base, Activation), {"__slots__": ()})
    with pytest.raises(TypeError, match="__init__ or __new__"):
        type("_Again", (deepsec.end_user,), {"__slots__": (), "_own_init": False})

    before = _current.get()
    # (A subclass callable without arguments: end_user() alone would fail on
    # its own, wanting an identity, and hide a missing check.)
    for refused in (deepsec.end_user, _LenientEndUser):
        with pytest.raises(TypeError, match="objects are made by calling"):
            new_activation(deepsec.EndUserContext("tok.refused"), refused)
    assert _current.get() is before  # nothing was made current


def test_a_lease_class_made_and_dropped_is_not_kept():
    """Refusing end_user's subclasses keeps no registry of them: a class made at
    run time (a test's, a plugin's) is collected once dropped."""
    import gc
    import weakref

    from deepsec.context import new_activation

    made = type("_Transient", (deepsec.end_user,), {"__slots__": ()})
    with pytest.raises(TypeError, match="objects are made by calling"):
        new_activation(deepsec.EndUserContext("tok.transient"), made)
    ref = weakref.ref(made)
    del made
    gc.collect()
    assert ref() is None


class _LenientEndUser(deepsec.end_user):
    """An end_user (built by its own __init__) that can be called without arguments."""

    __slots__ = ()

    def __init__(self, identity: Any = "tok.lenient") -> None:
        super().__init__(identity)


def test_the_adapters_hot_paths_build_what_new_activation_builds():
    """lifecycle._start and asgi._lease_by_bytes write new_activation() out (a
    call per request): every slot set as it sets them, for each adapter's lease
    class; and start() refuses a class new_activation() refuses."""
    from deepsec.asgi import _Exchange, _lease_by_bytes, _remembered_by_bytes, _start_in_full
    from deepsec.context import Activation, _current, new_activation
    from deepsec.fastapi import _DependencyLease
    from deepsec.lifecycle import _start, start
    from deepsec.web import WebSettings

    settings = WebSettings()
    authorization = "Bearer tok.hot.path"
    raw = [(b"authorization", authorization.encode())]
    remembered = _remembered_by_bytes(settings)

    def fields(activation: Activation) -> dict[str, Any]:
        slots = {name for cls in Activation.__mro__ for name in getattr(cls, "__slots__", ())}
        # (type, value): True and 1 are equal, and must not pass for each other.
        return {
            name: (type(value), value)
            for name in slots - {"_token"}
            for value in [getattr(activation, name)]
        }

    built = []
    for lease_class in (Activation, _Exchange, _DependencyLease):
        # (The very first call resolves in full; every other one finds the
        # resolution remembered under the raw header values.)
        for _ in range(2):
            made = _start(settings, None, None, authorization, lease_class)
            assert type(made) is lease_class
            built.append(made)
    # The ASGI adapters: a miss remembers the resolution under the header bytes...
    missed, _user, key = _lease_by_bytes(remembered, raw, _Exchange)
    assert missed is None and key is not None
    first, _user = _start_in_full(settings, None, raw, key, remembered, _Exchange)
    assert isinstance(first, _Exchange)
    built.append(first)
    # ... and a repeat of those bytes is one lookup, written-out activation included.
    for lease_class in (_Exchange, _DependencyLease):
        by_bytes, user, _key = _lease_by_bytes(remembered, raw, lease_class)
        assert type(by_bytes) is lease_class and user is by_bytes.context
        built.append(by_bytes)
    model = new_activation(built[0].context)
    expected = fields(model)
    for activation in reversed([*built, model]):  # ended in the reverse order made
        assert fields(activation) == expected
        assert _current.get() is activation and activation._token is not None
        activation.end()

    before = _current.get()
    for refused in (deepsec.end_user, _LenientEndUser):
        with pytest.raises(TypeError, match="objects are made by calling"):
            start(settings, None, cookie_header=None, authorization=authorization, lease=refused)

    class _NotALease:  # callable without arguments, takes any attribute
        pass

    for wrong, name in (
        (_NotALease, "_NotALease"),
        ("tok.secret.value", "str"),
        (None, "NoneType"),
    ):
        with pytest.raises(TypeError, match=f"must be an Activation subclass, not {name}$"):
            start(settings, None, cookie_header=None, authorization=authorization, lease=wrong)  # type: ignore[arg-type]
    assert _current.get() is before  # nothing was made current


def test_a_new_end_user_object_has_every_field_of_activation():
    """end_user fills Activation's fields itself: a slot added there must be set here."""
    from deepsec.context import Activation

    slots = {name for cls in Activation.__mro__ for name in getattr(cls, "__slots__", ())}
    for scope in (deepsec.end_user("tok.slots.x"), deepsec.end_user(("sam", None))):
        assert {name: hasattr(scope, name) for name in slots} == dict.fromkeys(slots, True)
