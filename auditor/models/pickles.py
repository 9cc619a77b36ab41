"""Reading a pickle as data: a symbolic evaluator over ``pickletools.genops``.

A pickle is a small stack program whose ``GLOBAL`` + ``REDUCE`` opcodes call any
importable function. ``pickle.load`` runs that program; this module never does. It
walks the opcodes, builds plain Python values (numbers, strings, lists, dicts,
tuples), and hands every reference to a global, every call, object construction and
persistent id to a ``PicklePolicy`` that either turns it into a symbolic value (a
tensor description, an empty dict) or refuses the whole pickle. Nothing is imported
and nothing is called, so a payload can at worst be refused.

Opcodes with no use in torch's pickles (``INST``, ``OBJ``, the extension registry,
out-of-band buffers, text persistent ids) are refused outright.
"""

from __future__ import annotations

import io
import pickletools
from dataclasses import dataclass
from typing import Any, Protocol

MAX_PICKLE_OPS = 5_000_000


class PickleRefused(ValueError):
    """The pickle does something the policy does not allow, or is malformed."""


@dataclass(frozen=True)
class Global:
    """A reference to ``module.name``, never imported."""

    module: str
    name: str

    @property
    def qualified(self) -> str:
        return f"{self.module}.{self.name}"


class PicklePolicy(Protocol):
    """What a given kind of pickle may contain."""

    def call(self, func: Global, args: tuple) -> Any:
        """The symbolic result of ``func(*args)`` (REDUCE), or raise ``PickleRefused``."""

    def new_object(self, cls: Global, args: tuple) -> Any:
        """The symbolic result of ``cls.__new__(cls, *args)`` (NEWOBJ), or raise."""

    def build(self, obj: Any, state: Any) -> None:
        """Apply ``BUILD`` (``__setstate__``) to a value produced earlier, or raise."""

    def persistent(self, pid: Any) -> Any:
        """The value of a persistent id (torch's tensor storages), or raise."""


_PUSH_ARG = frozenset({
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
    "STRING", "BINSTRING", "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8",
    "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8",
})
_CONSTANTS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}
_IGNORED = frozenset({"PROTO", "FRAME"})


class _Machine:
    """The unpickler's stack machine with values in place of effects."""

    def __init__(self, policy: PicklePolicy):
        self.policy = policy
        self.stack: list[Any] = []
        self.metastack: list[list[Any]] = []
        self.memo: dict[int, Any] = {}

    def pop(self) -> Any:
        if not self.stack:
            raise PickleRefused("malformed pickle: stack underflow")
        return self.stack.pop()

    def top(self) -> Any:
        if not self.stack:
            raise PickleRefused("malformed pickle: stack underflow")
        return self.stack[-1]

    def pop_mark(self) -> list[Any]:
        if not self.metastack:
            raise PickleRefused("malformed pickle: no mark")
        items, self.stack = self.stack, self.metastack.pop()
        return items

    def step(self, name: str, arg: Any) -> None:
        if name in _IGNORED:
            return
        if name in _PUSH_ARG:
            self.stack.append(bytes(arg) if isinstance(arg, bytearray) else arg)
        elif name in _CONSTANTS:
            self.stack.append(_CONSTANTS[name])
        else:
            handler = getattr(self, f"op_{name.lower()}", None)
            if handler is None:
                raise PickleRefused(f"opcode {name} is not allowed in a checkpoint")
            handler(arg)

    # containers
    def op_empty_list(self, _: Any) -> None:
        self.stack.append([])

    def op_empty_dict(self, _: Any) -> None:
        self.stack.append({})

    def op_empty_tuple(self, _: Any) -> None:
        self.stack.append(())

    def op_empty_set(self, _: Any) -> None:
        self.stack.append(set())

    def op_mark(self, _: Any) -> None:
        self.metastack.append(self.stack)
        self.stack = []

    def op_list(self, _: Any) -> None:
        items = self.pop_mark()  # before touching self.stack: pop_mark replaces it
        self.stack.append(items)

    def op_tuple(self, _: Any) -> None:
        items = self.pop_mark()
        self.stack.append(tuple(items))

    def op_tuple1(self, _: Any) -> None:
        self.stack.append((self.pop(),))

    def op_tuple2(self, _: Any) -> None:
        b, a = self.pop(), self.pop()
        self.stack.append((a, b))

    def op_tuple3(self, _: Any) -> None:
        c, b, a = self.pop(), self.pop(), self.pop()
        self.stack.append((a, b, c))

    def op_dict(self, _: Any) -> None:
        items = self.pop_mark()
        self.stack.append({})
        self._set_items(items)

    def op_frozenset(self, _: Any) -> None:
        items = self.pop_mark()
        self.stack.append(frozenset(_hashable(v) for v in items))

    def op_append(self, _: Any) -> None:
        value = self.pop()
        self._target(list).append(value)

    def op_appends(self, _: Any) -> None:
        items = self.pop_mark()
        self._target(list).extend(items)

    def op_setitem(self, _: Any) -> None:
        value, key = self.pop(), self.pop()
        self._set_items([key, value])

    def op_setitems(self, _: Any) -> None:
        self._set_items(self.pop_mark())

    def op_additems(self, _: Any) -> None:
        items = self.pop_mark()
        target = self._target(set)
        target.update(_hashable(v) for v in items)

    def _target(self, kind: type) -> Any:
        target = self.top()
        if not isinstance(target, kind):
            raise PickleRefused(f"malformed pickle: adding items to a {type(target).__name__}")
        return target

    def _set_items(self, items: list[Any]) -> None:
        if len(items) % 2:
            raise PickleRefused("malformed pickle: odd number of dict items")
        target = self._target(dict)
        for key, value in zip(items[::2], items[1::2]):
            target[_hashable(key)] = value

    # stack and memo
    def op_pop(self, _: Any) -> None:
        if self.stack:
            self.stack.pop()
        else:
            self.pop_mark()

    def op_pop_mark(self, _: Any) -> None:
        self.pop_mark()

    def op_dup(self, _: Any) -> None:
        self.stack.append(self.top())

    def op_get(self, index: Any) -> None:
        if index not in self.memo:
            raise PickleRefused("malformed pickle: memo key missing")
        self.stack.append(self.memo[index])

    op_binget = op_long_binget = op_get

    def op_put(self, index: Any) -> None:
        self.memo[index] = self.top()

    op_binput = op_long_binput = op_put

    def op_memoize(self, _: Any) -> None:
        self.memo[len(self.memo)] = self.top()

    # the opcodes that would run code
    def op_global(self, arg: str) -> None:
        module, _, name = arg.partition(" ")
        self.stack.append(Global(module, name))

    def op_stack_global(self, _: Any) -> None:
        name, module = self.pop(), self.pop()
        if not isinstance(module, str) or not isinstance(name, str):
            raise PickleRefused("malformed pickle: STACK_GLOBAL without names")
        self.stack.append(Global(module, name))

    def op_reduce(self, _: Any) -> None:
        args, func = self.pop(), self.pop()
        if not isinstance(func, Global) or not isinstance(args, tuple):
            raise PickleRefused("the pickle calls something that is not a named function")
        self.stack.append(self.policy.call(func, args))

    def op_newobj(self, _: Any) -> None:
        args, cls = self.pop(), self.pop()
        if not isinstance(cls, Global) or not isinstance(args, tuple):
            raise PickleRefused("the pickle builds an object of an unnamed class")
        self.stack.append(self.policy.new_object(cls, args))

    def op_build(self, _: Any) -> None:
        state = self.pop()
        self.policy.build(self.top(), state)

    def op_binpersid(self, _: Any) -> None:
        self.stack.append(self.policy.persistent(self.pop()))


def _hashable(value: Any) -> Any:
    try:
        hash(value)
    except TypeError:
        raise PickleRefused("malformed pickle: unhashable dict key or set item") from None
    return value


def evaluate_pickle(data: bytes, policy: PicklePolicy, *, max_ops: int = MAX_PICKLE_OPS) -> Any:
    """The value the pickle describes, built without importing or calling anything."""
    machine = _Machine(policy)
    try:
        for count, (opcode, arg, _pos) in enumerate(pickletools.genops(io.BytesIO(data))):
            if count >= max_ops:
                raise PickleRefused(f"the pickle has more than {max_ops} operations")
            if opcode.name == "STOP":
                if machine.metastack or len(machine.stack) != 1:
                    raise PickleRefused("malformed pickle: STOP with a dirty stack")
                return machine.stack[0]
            machine.step(opcode.name, arg)
    except PickleRefused:
        raise
    except (ValueError, KeyError, TypeError, IndexError, MemoryError, UnicodeDecodeError) as exc:
        raise PickleRefused(f"malformed pickle: {exc}") from None
    raise PickleRefused("malformed pickle: no STOP opcode")
