"""The current end user: who the database work of this thread or task is done for.

One :class:`contextvars.ContextVar` holds the current :class:`EndUserContext`
(the immutable value, :mod:`deepsec._end_user_context`).
Threads start with their own empty context and asyncio tasks copy their
parent's, so concurrent requests never see each other's end user.  This is
what python-oracledb's plugin got wrong: it kept the identity in a
``threading.local``, shared by every asyncio task on the event loop thread.

Adapters call :func:`activate` / :func:`deactivate` around a request; scripts
and jobs use ``with deepsec.end_user(...)``; code written for
``oracledb.plugins.end_user_sec_provider`` keeps calling
``set_end_user_identity`` and friends.
"""

from __future__ import annotations

import contextvars
import copy
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar, overload

# The value class lives in its own module; it is imported from here, as before.
from ._end_user_context import _EMPTY as _EMPTY
from ._end_user_context import APPLICATION as APPLICATION
from ._end_user_context import EndUserContext as EndUserContext
from ._end_user_context import context_for_token
from ._end_user_context import forget_token_contexts as forget_token_contexts
from ._validation import MAX_IDENTITY_LENGTH as MAX_IDENTITY_LENGTH
from ._validation import Identity as Identity

__all__ = [
    "Activation",
    "EndUserContext",
    "Identity",
    "activate",
    "as_application",
    "current_end_user",
    "deactivate",
    "end_user",
    "get_end_user_attributes",
    "get_end_user_data_roles",
    "get_end_user_identity",
    "new_activation",
    "restore_point",
    "set_end_user_attributes",
    "set_end_user_data_roles",
    "set_end_user_identity",
]


class Activation:
    """One activation of a context: the contextvar's value, and its own lease.

    :func:`activate` returns one; ending it (:meth:`end`, :func:`deactivate`,
    or leaving ``with``) restores the previous context.  A contextvar value is
    copied into every asyncio task and every ``asyncio.to_thread``/executor
    call made while it is set, and such work can outlive the request.  All
    those copies hold this same object, so ending it ends the identity
    everywhere at once: work still running afterwards has no end user.
    """

    __slots__ = ("_children", "_token", "active", "context")

    context: EndUserContext
    active: bool
    #: Values the plugin-style setters derive from this one: they end with it.
    _children: list[Activation] | None
    _token: contextvars.Token[Activation] | None

    #: Whether the class is built by its own ``__init__`` (:class:`end_user`,
    #: whose objects start inactive) rather than by :func:`new_activation`.
    _own_init: ClassVar[bool] = False

    # :func:`new_activation` is the one constructor (written out, not called,
    # in the two hot paths the adapters share): it calls the class without
    # arguments and sets the fields itself.  No Python ``__init__``
    # (hence ``Activation(context)`` is a TypeError, "takes no arguments", and
    # a bare ``Activation()`` has no field: ending or entering it raises
    # AttributeError; it is never current):
    # adapters make one per request, and that class call then runs in C
    # alone: about 280 instructions fewer than ``object.__new__(cls)``, whose
    # call CPython 3.11 cannot specialize (measured under cachegrind).
    def __init_subclass__(cls, **kwargs: Any) -> None:
        # new_activation() calls the class: an __init__ or __new__ other than
        # object's -- its own or a mixin's -- would run on every request (or
        # fail it, wanting arguments).  Refuse it at class creation.
        super().__init_subclass__(**kwargs)
        if not cls._own_init and (
            cls.__init__ is not object.__init__ or cls.__new__ is not object.__new__
        ):
            raise TypeError(
                f"{cls.__name__} has an __init__ or __new__ of its own or a base's; an "
                "Activation subclass may not (new_activation() calls the class and sets "
                "the fields): set its own fields after new_activation(context, cls) instead"
            )

    def end(self) -> None:
        """End the identity everywhere and restore the previous context.

        Safe to call twice, and from another thread or task than the one that
        activated it (then only the lease ends: that context is not ours to reset).
        """
        # End the lease first: even if the reset below fails, no copy of this
        # context keeps its identity.
        self.active = False
        if self._children:
            children, self._children = self._children, None
            for child in children:
                child.active = False
                child._children = None  # no cycle left for the garbage collector
            children.clear()
        token = self._token
        if token is not None:
            self._token = None
            # Runs on every request: a plain try (contextlib.suppress costs more).
            try:  # noqa: SIM105
                _current.reset(token)
            except ValueError:
                pass  # made in another Context: its copy reads as ended anyway

    def __enter__(self) -> EndUserContext:
        return self.context

    # Named parameters, not *exc_info: CPython 3.11 specializes the call a
    # ``with`` makes only to a function without *args (~190 instructions).
    def __exit__(self, et: object = None, exc: object = None, tb: object = None) -> None:
        self.end()

    def __repr__(self) -> str:
        # (getattr: a bare Activation() has no fields; repr must not raise.)
        return f"<deepsec Activation {'active' if getattr(self, 'active', False) else 'ended'}>"


_A = TypeVar("_A", bound=Activation)


@overload
def new_activation(context: EndUserContext, *, current: bool = True) -> Activation: ...
@overload
def new_activation(context: EndUserContext, cls: type[_A], current: bool = True) -> _A: ...
def new_activation(
    context: EndUserContext, cls: type[Activation] = Activation, current: bool = True
) -> Activation:
    """A new activation of ``context`` (of class ``cls``), made current unless ``current=False``.

    The one constructor of :class:`Activation` and its subclasses but
    :class:`end_user`, whose objects start inactive (refused here: its own
    ``__init__`` sets fields this does not).  ``Activation()`` alone sets no
    field: use this.
    (``current`` is not keyword-only: a call that leaves a keyword-only
    default costs CPython 3.11 a slower frame set-up, on every request.)
    """
    if cls is not Activation:
        _check_lease_class(cls)
    # The adapters' hot paths repeat these lines (deepsec.lifecycle._start,
    # deepsec.asgi._lease_by_bytes); tests/test_context.py holds them in step.
    activation = cls()
    activation.context = context
    activation.active = True
    activation._children = None
    activation._token = _current.set(activation) if current else None
    return activation


def _check_lease_class(cls: type[Activation]) -> None:
    """Refuse a class :func:`new_activation` cannot build: not an :class:`Activation`,
    or one whose objects start inactive.  Off the adapters' request paths."""
    if not (isinstance(cls, type) and issubclass(cls, Activation)):
        # (The type's name only: a value passed by mistake may be a token.)
        name = cls.__name__ if isinstance(cls, type) else type(cls).__name__
        raise TypeError(f"a lease class must be an Activation subclass, not {name}")
    if cls._own_init:
        raise TypeError(f"{cls.__name__} objects are made by calling {cls.__name__}(...)")


# The default is shared by every thread and task, which is safe: it is never
# ended and its context is immutable.
_FOREVER = new_activation(_EMPTY, current=False)
_current: contextvars.ContextVar[Activation] = contextvars.ContextVar(
    "deepsec_end_user",
    default=_FOREVER,
)
#: ``_current.get``, bound once for the hot paths of other modules: CPython
#: 3.11 compiles ``imported_name.method()`` as an attribute read it does not
#: specialize (a bound method made on every call).
_current_activation = _current.get


def current_context() -> EndUserContext:
    """The context of the calling thread or task (possibly without identity).

    A context whose activation has ended (the request is over) is no context.
    """
    activation = _current.get()
    return activation.context if activation.active else _EMPTY


def current_end_user() -> EndUserContext | None:
    """The current end user's context, or ``None`` when there is no end user."""
    ctx = current_context()
    return ctx if ctx.identity is not None else None


def activate(context: EndUserContext | None) -> Activation:
    """Make ``context`` current; return the :class:`Activation` that ends it.

    Adapters call this at the start of a request and end the activation when
    the response is done (:func:`deactivate`, or ``activation.end()``).
    """
    if context is None:
        return new_activation(_EMPTY)
    if type(context) is not EndUserContext and not isinstance(context, EndUserContext):
        raise TypeError(f"expected EndUserContext or None, not {type(context).__name__}")
    return new_activation(context)


def deactivate(activation: Activation) -> None:
    """End the activation and restore the context that was current before it.

    Tasks and threads that copied the context (and may outlive the request)
    see no end user from now on.
    """
    activation.end()


def restore_point() -> Callable[[], None]:
    """Snapshot the current scope; the returned function restores exactly it.

    For code that runs other code in the caller's scope (an eager Celery
    task) and must undo whatever that code changed in it, such as
    ``set_end_user_identity``, without ending the caller's scope.
    """
    token = _current.set(_current.get())
    return lambda: _current.reset(token)


def _replace_current(**changes: Any) -> None:
    # The plugin-style setters change the current context in place; the new
    # value ends with the activation that is running (the request), or never
    # if that one is already over.
    parent = _current.get()
    inherited = parent.active
    base = parent.context if inherited else _EMPTY
    child = new_activation(base.replace(**changes), current=False)  # slow: validates
    if not inherited:
        pass  # the request is over: the value never ends
    elif parent._children is not None or parent._token is not None:
        with _family_lock:  # two threads creating the list must not lose a child
            # One list per activation, shared by every value derived from it.
            family = parent._children
            if family is None:
                family = parent._children = []
            family.append(child)
        child._children = family
        # end() may have run since the check above (it marks the parent
        # ended before it takes the list): then this child, appended too
        # late or to a list already cleared, must end here.
        if not parent.active:
            child.active = False
    elif not parent.active:
        child.active = False  # derived from a request that ended meanwhile
    _current.set(child)


_family_lock = threading.Lock()


# --- the python-oracledb plugin's functions, on the contextvar -------------


def set_end_user_identity(value: Identity | list[Any] | None) -> None:
    """Set the end-user identity of the current thread or task (``None`` clears it)."""
    _replace_current(identity=value)


def get_end_user_identity() -> Identity | None:
    """The current end-user identity (a ``(name, key)`` identity stays a tuple)."""
    return current_context().identity


def set_end_user_data_roles(value: Sequence[str] | None) -> None:
    """Set the data roles of the current thread or task (``None`` clears them)."""
    _replace_current(data_roles=value)


def get_end_user_data_roles() -> list[str] | None:
    """The current data roles as a new list, or ``None``."""
    roles = current_context().data_roles
    return None if roles is None else list(roles)


def set_end_user_attributes(value: Mapping[str, Any] | None) -> None:
    """Set the end-user attributes of the current thread or task (``None`` clears them)."""
    _replace_current(attributes=value)


def get_end_user_attributes() -> dict[str, Any] | None:
    """The current attributes as a new dict, or ``None``."""
    attrs = current_context().attributes
    return None if attrs is None else copy.deepcopy(dict(attrs))


class end_user(Activation):  # a class used like a function: ``with deepsec.end_user(...)``
    """Scope a block of sync or async code to one end user.

    ``with deepsec.end_user(token):`` or ``async with deepsec.end_user(("bob",
    None), attributes={...}):``.  The previous context is restored on exit,
    also on exceptions.  ``end_user(None)`` scopes a block to *no* end user.
    ``async with`` also fetches the database-access tokens the block will need
    off the event loop, so asyncio connections never wait on the network.
    Tasks started inside the block lose the end user when the block exits.

    The object is the first block's :class:`Activation` (one object per
    ``with``: this runs for every request).  A block entered again with the
    same object gets a new activation: the first one's copies, in tasks that
    outlived it, must stay ended.
    """

    __slots__ = ("_again", "_used")

    _own_init = True  # (its __init__ sets every field; it starts inactive)

    def __init__(
        self,
        identity: Identity | list[Any] | None,
        *,
        data_roles: Sequence[str] | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> None:
        if data_roles is None and attributes is None and type(identity) is str:
            self.context = context_for_token(identity)  # (a repeat token: one dict lookup)
        else:
            self.context = EndUserContext(identity, data_roles, attributes)
        self.active = False  # (not current until the block is entered)
        self._children = self._token = None
        self._used = False
        #: The activation of a later block with this object.
        self._again: Activation | None = None

    def __enter__(self) -> EndUserContext:
        if not self._used:
            self._used = self.active = True
            self._token = _current.set(self)
            return self.context
        # One block at a time: shared by two threads or tasks, their exits
        # would end each other's activations.
        if self.active or self._again is not None:
            raise RuntimeError("this end_user(...) object is already in use; create one per block")
        self._again = new_activation(self.context)
        return self.context

    def __exit__(self, et: object = None, exc: object = None, tb: object = None) -> None:
        again = self._again
        if again is None:
            self.end()
        else:
            self._again = None
            again.end()

    async def __aenter__(self) -> EndUserContext:
        context = self.__enter__()
        try:
            from .prefetch import prepare

            await prepare()
        except BaseException:
            self.__exit__()
            raise
        return context

    async def __aexit__(self, et: object = None, exc: object = None, tb: object = None) -> None:
        self.__exit__()

    def __repr__(self) -> str:
        return f"end_user({self.context!r})"


class as_application:  # a class used like a function: ``with deepsec.as_application():``
    """Scope a block of sync or async code to the application itself, on purpose.

    Inside the block there is no end user, even if one was current, and
    connections in strict mode (``require_end_user=True``) let statements
    through: it is the explicit scope for application-level work such as
    migrations, health checks and schedulers.  The previous context is
    restored on exit.  Like :class:`end_user`, asyncio tasks and
    ``asyncio.to_thread``/executor calls started inside the block run as the
    application until the block exits, and with no end user (refused in
    strict mode) afterwards.  A plain ``threading.Thread`` starts with no end
    user at all (contextvars are not copied into it), so strict mode refuses
    its statements unless it enters ``as_application()`` itself.
    """

    __slots__ = ("_activation",)

    def __init__(self) -> None:
        self._activation: Activation | None = None

    def __enter__(self) -> None:
        if self._activation is not None:
            raise RuntimeError(
                "this as_application() object is already in use; create one per block"
            )
        self._activation = new_activation(APPLICATION)

    def __exit__(self, et: object = None, exc: object = None, tb: object = None) -> None:
        activation, self._activation = self._activation, None
        if activation is not None:
            activation.end()

    async def __aenter__(self) -> None:
        self.__enter__()

    async def __aexit__(self, et: object = None, exc: object = None, tb: object = None) -> None:
        self.__exit__()

    def __repr__(self) -> str:
        return "as_application()"
