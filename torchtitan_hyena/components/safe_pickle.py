"""An allow-list unpickler for plain data, built the way ``torch.load(weights_only=True)`` builds its own.

``pickle.load`` runs whatever callable a pickle names, so a pickle from someone else is code from someone
else. This interpreter executes the opcodes itself and gives a pickle only what it needs to describe data:
literals, containers, and the objects of an explicit allow-list of ``(module, name)`` pairs. Unlike a
``pickle.Unpickler`` with a restricted ``find_class``, it also restricts what the other opcodes may do with
those objects: ``REDUCE``/``NEWOBJ`` only call allow-listed callables, ``BUILD`` only fills in instances of
allow-listed classes (never a class itself), and ``APPEND``/``SETITEM``/``ADDITEMS`` only touch lists, dicts
and sets. Persistent ids, out-of-band buffers, the extension registry and the text-protocol opcodes (which no
``pickle.dump`` since protocol 2 writes) are refused. Opcodes are those of ``pickle`` protocols 2 to 5.
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Mapping
from typing import Any

_unpack = struct.unpack_from
_uint2 = struct.Struct("<H").unpack_from
_uint4 = struct.Struct("<I").unpack_from


class UnsafePickleError(Exception):
    """The pickle asks for something outside the allow-list, or is not a well-formed pickle."""


# The opcodes, as integers (most frequent in DCP metadata first in the loop below).
(MEMOIZE, LONG_BINGET, BINGET, EMPTY_TUPLE, NEWOBJ, SHORT_BINUNICODE, MARK, BUILD, EMPTY_DICT, SETITEMS, TUPLE2,
 BININT2, TUPLE1, BININT, REDUCE, BININT1, NONE, NEWFALSE, NEWTRUE, TUPLE, EMPTY_LIST, APPEND, APPENDS, TUPLE3,
 STACK_GLOBAL, GLOBAL, BINUNICODE, BINUNICODE8, BINFLOAT, LONG1, LONG4, SHORT_BINBYTES, BINBYTES, BINBYTES8,
 BINPUT, LONG_BINPUT, SETITEM, LIST, DICT, EMPTY_SET, ADDITEMS, FROZENSET, NEWOBJ_EX, POP, POP_MARK, DUP, PROTO,
 FRAME, STOP) = (code[0] for code in (
    pickle.MEMOIZE, pickle.LONG_BINGET, pickle.BINGET, pickle.EMPTY_TUPLE, pickle.NEWOBJ, pickle.SHORT_BINUNICODE,
    pickle.MARK, pickle.BUILD, pickle.EMPTY_DICT, pickle.SETITEMS, pickle.TUPLE2, pickle.BININT2, pickle.TUPLE1,
    pickle.BININT, pickle.REDUCE, pickle.BININT1, pickle.NONE, pickle.NEWFALSE, pickle.NEWTRUE, pickle.TUPLE,
    pickle.EMPTY_LIST, pickle.APPEND, pickle.APPENDS, pickle.TUPLE3, pickle.STACK_GLOBAL, pickle.GLOBAL,
    pickle.BINUNICODE, pickle.BINUNICODE8, pickle.BINFLOAT, pickle.LONG1, pickle.LONG4, pickle.SHORT_BINBYTES,
    pickle.BINBYTES, pickle.BINBYTES8, pickle.BINPUT, pickle.LONG_BINPUT, pickle.SETITEM, pickle.LIST, pickle.DICT,
    pickle.EMPTY_SET, pickle.ADDITEMS, pickle.FROZENSET, pickle.NEWOBJ_EX, pickle.POP, pickle.POP_MARK, pickle.DUP,
    pickle.PROTO, pickle.FRAME, pickle.STOP,
))  # fmt: skip


class _Machine:
    """The pickle virtual machine, restricted: see the module docstring."""

    def __init__(self, allowed: Mapping[tuple[str, str], Any]) -> None:
        self.allowed = allowed
        self.callables = {id(v) for v in allowed.values() if callable(v)}
        self.classes = {v for v in allowed.values() if isinstance(v, type)}
        self.setstate = {c: c.__setstate__ for c in self.classes if hasattr(c, "__setstate__")}

    def resolve(self, module: Any, name: Any) -> Any:
        if (module, name) not in self.allowed:
            raise UnsafePickleError(f"it refers to {module}.{name}, which is not checkpoint data")
        return self.allowed[(module, name)]

    def new(self, cls: Any, args: Any, kwargs: Any = None) -> Any:
        if cls not in self.classes or type(args) is not tuple or type(kwargs) not in (dict, type(None)):
            raise UnsafePickleError(f"it creates {getattr(cls, '__qualname__', type(cls).__name__)}")
        return cls.__new__(cls, *args, **(kwargs or {}))

    def build(self, inst: Any, state: Any) -> None:
        cls = type(inst)
        if cls not in self.classes:  # a class object's type is its metaclass: never in the list
            raise UnsafePickleError(f"it sets the state of a {cls.__qualname__}")
        setstate = self.setstate.get(cls)
        if setstate is not None:
            setstate(inst, state)
            return
        slots = None
        if type(state) is tuple and len(state) == 2:
            state, slots = state
        if type(state) not in (dict, type(None)) or type(slots) not in (dict, type(None)):
            raise UnsafePickleError(f"the state of a {cls.__qualname__} is not a dict")
        if state:
            inst.__dict__.update(state)
        for key, value in (slots or {}).items():
            object.__setattr__(inst, str(key), value)

    def run(self, data: bytes) -> Any:
        """One flat dispatch loop, most frequent opcodes first: the fast way to run a pickle in Python."""
        stack: list[Any] = []
        marks: list[int] = []
        memo: dict[int, Any] = {}
        append = stack.append
        pos = 0

        def pop_mark() -> list[Any]:
            start = marks.pop()
            items = stack[start:]
            del stack[start:]
            return items

        pop = stack.pop
        classes, callables = self.classes, self.callables
        while True:
            op = data[pos]
            pos += 1
            # The opcodes DCP metadata is made of, by frequency; the rest below.
            if op == MEMOIZE:
                memo[len(memo)] = stack[-1]
            elif op == LONG_BINGET:
                append(memo[_uint4(data, pos)[0]])
                pos += 4
            elif op == BINGET:
                append(memo[data[pos]])
                pos += 1
            elif op == BININT2:
                append(_uint2(data, pos)[0])
                pos += 2
            elif op == BININT1:
                append(data[pos])
                pos += 1
            elif op == MARK:
                marks.append(len(stack))
            elif op == EMPTY_TUPLE:
                append(())
            elif op == NEWOBJ:
                args = pop()
                cls = stack[-1]
                if cls not in classes or type(args) is not tuple:
                    raise UnsafePickleError(f"it creates {getattr(cls, '__qualname__', type(cls).__name__)}")
                stack[-1] = cls.__new__(cls, *args)
            elif op == TUPLE1:
                stack[-1] = (stack[-1],)
            elif op == BUILD:
                state = pop()
                self.build(stack[-1], state)
            elif op == SETITEMS:
                items = pop_mark()
                target = stack[-1]
                if not isinstance(target, dict) or len(items) % 2:
                    raise UnsafePickleError(f"it sets items of a {type(target).__name__}")
                target.update(zip(items[::2], items[1::2]))
            elif op == EMPTY_DICT:
                append({})
            elif op == REDUCE:
                args = pop()
                func = stack[-1]
                if id(func) not in callables or type(args) is not tuple:
                    raise UnsafePickleError(f"it calls {getattr(func, '__qualname__', type(func).__name__)}")
                stack[-1] = func(*args)
            elif op == TUPLE2:
                last = pop()
                stack[-1] = (stack[-1], last)
            elif op == SHORT_BINUNICODE:
                n = data[pos]
                append(data[pos + 1 : pos + 1 + n].decode("utf-8", "surrogatepass"))
                pos += 1 + n
            elif op == NONE:
                append(None)
            elif op == SETITEM:
                value, key = pop(), pop()
                if not isinstance(stack[-1], dict):
                    raise UnsafePickleError(f"it sets items of a {type(stack[-1]).__name__}")
                stack[-1][key] = value
            elif op == TUPLE3:
                if len(stack) < 3:
                    raise IndexError("stack underflow")
                items = tuple(stack[-3:])
                del stack[-3:]
                append(items)
            elif op == BININT:
                append(_unpack("<i", data, pos)[0])
                pos += 4
            elif op == NEWFALSE:
                append(False)
            elif op == NEWTRUE:
                append(True)
            elif op == TUPLE:
                append(tuple(pop_mark()))
            elif op == EMPTY_LIST:
                append([])
            elif op in (APPEND, APPENDS):
                items = [stack.pop()] if op == APPEND else pop_mark()
                if type(stack[-1]) is not list:
                    raise UnsafePickleError(f"it appends to a {type(stack[-1]).__name__}")
                stack[-1].extend(items)
            elif op == STACK_GLOBAL:
                name, module = stack.pop(), stack.pop()
                append(self.resolve(module, name))
            elif op == GLOBAL:
                end = data.index(b"\n", pos)
                end2 = data.index(b"\n", end + 1)
                module, name = data[pos:end].decode("ascii"), data[end + 1 : end2].decode("ascii")
                pos = end2 + 1
                append(self.resolve(module, name))
            elif op in (BINUNICODE, BINUNICODE8, SHORT_BINBYTES, BINBYTES, BINBYTES8):
                width = {SHORT_BINBYTES: 1, BINUNICODE: 4, BINBYTES: 4}.get(op, 8)
                n = int.from_bytes(data[pos : pos + width], "little")
                pos += width
                raw = data[pos : pos + n]
                if len(raw) != n:
                    raise IndexError("string runs past the end")
                pos += n
                append(raw.decode("utf-8", "surrogatepass") if op in (BINUNICODE, BINUNICODE8) else bytes(raw))
            elif op == BINFLOAT:
                append(_unpack(">d", data, pos)[0])
                pos += 8
            elif op in (LONG1, LONG4):
                width = 1 if op == LONG1 else 4
                n = int.from_bytes(data[pos : pos + width], "little")
                pos += width
                append(int.from_bytes(data[pos : pos + n], "little", signed=True))
                pos += n
            elif op in (BINPUT, LONG_BINPUT):
                if op == BINPUT:
                    memo[data[pos]] = stack[-1]
                    pos += 1
                else:
                    memo[_uint4(data, pos)[0]] = stack[-1]
                    pos += 4
            elif op == LIST:
                append(pop_mark())
            elif op == DICT:
                items = pop_mark()
                if len(items) % 2:
                    raise IndexError("odd number of dict items")
                append(dict(zip(items[::2], items[1::2])))
            elif op == EMPTY_SET:
                append(set())
            elif op == ADDITEMS:
                items = pop_mark()
                if type(stack[-1]) is not set:
                    raise UnsafePickleError(f"it adds items to a {type(stack[-1]).__name__}")
                stack[-1].update(items)
            elif op == FROZENSET:
                append(frozenset(pop_mark()))
            elif op == NEWOBJ_EX:
                kwargs, args = stack.pop(), stack.pop()
                stack[-1] = self.new(stack[-1], args, kwargs)
            elif op == POP:
                if marks and marks[-1] == len(stack):
                    marks.pop()
                else:
                    stack.pop()
            elif op == POP_MARK:
                pop_mark()
            elif op == DUP:
                append(stack[-1])
            elif op == PROTO:
                if data[pos] > pickle.HIGHEST_PROTOCOL:
                    raise UnsafePickleError(f"it uses pickle protocol {data[pos]}")
                pos += 1
            elif op == FRAME:
                pos += 8
            elif op == STOP:
                if len(stack) != 1 or marks:
                    raise UnsafePickleError("it does not end with exactly one object")
                return stack[0]
            else:
                raise UnsafePickleError(f"it uses pickle opcode {bytes([op])!r}, which plain data never needs")


def restricted_loads(data: bytes, allowed: Mapping[tuple[str, str], Any]) -> Any:
    """Unpickle ``data``, resolving globals only through ``allowed`` (``(module, name) -> object``).

    Raises :class:`UnsafePickleError` naming the first refused global or opcode, or what is malformed.
    """
    if data[:1] != pickle.PROTO:  # every pickle since protocol 2 starts with it
        raise UnsafePickleError("it is not a pickle (damaged, or another file format)")
    try:
        return _Machine(allowed).run(data)
    except UnsafePickleError:
        raise
    except Exception as e:  # truncated data, a bad memo index, a constructor refusing its arguments
        raise UnsafePickleError(f"it is not a well-formed pickle ({type(e).__name__}: {e})") from None
