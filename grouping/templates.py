"""Sandboxed Jinja2 for user templates: Grafana OnCall's environment, filters and
error texts, plus a time budget and size limits so no template can hold the host.

Every filter, test, method call and amplifying operation is bounded so that one
uninterruptible C call stays a few milliseconds; what a render builds is charged against
a memory allowance; the inline pass (on the event loop) hands any big call to a worker;
worker renders take turns so the event loop shares the GIL with one of them at a time.
"""

from __future__ import annotations

import base64
import functools
import itertools
import json
import math
import re
import threading
import types
from collections.abc import Callable, Iterator, Mapping, Sized
from dataclasses import dataclass
from time import monotonic, sleep

import jinja2
import regex
from jinja2 import nodes, pass_context, pass_environment, pass_eval_context
from jinja2.exceptions import SecurityError, TemplateSyntaxError, UndefinedError
from jinja2.filters import make_attrgetter
from jinja2.runtime import new_context
from jinja2.sandbox import SandboxedEnvironment, SandboxedEscapeFormatter, SandboxedFormatter
from jinja2.visitor import NodeTransformer
from markupsafe import Markup

from . import timefilters

MAX_TEMPLATE_LENGTH = 50_000
MAX_RESULT_LENGTH = 50_000
MAX_TITLE_LENGTH = 500

# What one operation may build: far above any real alert, far below a memory problem.
_MAX_BUILT_CHARS = 10_000_000
_MAX_BUILT_ITEMS = 1_000_000
# All text the output statements of one render may produce, macro and block bodies
# included: bounds amplification by re-emitting a captured result.
_MAX_EMITTED_CHARS = 10_000_000
# One filter, test or method call is usually one C call: it cannot be interrupted and it
# holds the GIL, so the event loop waits for it. These bound every such call to a few ms
# (bench/hostile_templates.py): items it may take in or give out (sorting 100k strings
# takes ~30 ms, and a string a filter walks item by item counts its characters) ...
_MAX_ITEMS = 100_000
# ... and the input of filters that work word by word (wordwrap's word-splitting regex
# alone takes ~100 ms over 600k characters).
_MAX_WORDWISE_CHARS = 100_000
# Everything one render builds (strings, lists, their slots), freed since or not: bounds
# what a render can hold (list.append in a loop, deep recursion) whatever its deadline.
# Four render threads at most: 4 x 48 MB stays under the 256 MB a daemon may grow by.
_MAX_RENDER_BYTES = 48 * 1024 * 1024
# The inline pass runs on the event loop: a call bigger than this moves the render to a
# worker thread instead (sorting 2k items or copying 200k characters takes ~0.1 ms).
_INLINE_ITEMS = 2_000
_INLINE_CHARS = 200_000
# 10**20000 is already too long to print (Python's 4300-digit str limit).
_MAX_INT_BITS = 65_536
_REGEX_TIMEOUT = 2.0  # Grafana OnCall's per-call regex timeout


class TemplateCompileError(ValueError):
    """A template that cannot be compiled; str() is a one-line reason."""


class NeedsMoreTime(Exception):
    """An escalating budget ran out: re-run the render in a worker with the full budget."""


@dataclass(frozen=True)
class Budget:
    """When a render must stop, and what running out means."""

    deadline: float  # a time.monotonic() instant
    escalate: bool = False  # True: running out raises NeedsMoreTime; False: a Template Error
    seconds: float = 1.0  # the configured full budget, only for the error text


@dataclass(frozen=True)
class Outcome:
    """A render's result: text, or the OnCall-style error text."""

    text: str | None
    error: str | None


class Declined(Exception):
    """A native equivalent is not sure of its input: the sandbox renders it instead."""


@dataclass(frozen=True)
class NativeTemplate:
    """A compiled template paired with an exact Python equivalent, which render() tries first.

    The equivalent returns the text the sandbox would, or raises (Declined, or anything it
    did not foresee) and the sandbox renders; errors, limits and the budget stay the sandbox's.
    """

    sandboxed: jinja2.Template
    native: Callable[[dict], str]


class _OutOfTime(BaseException):
    # BaseException so that no `except Exception` in a filter or in Jinja swallows it.
    pass


class _RenderState(threading.local):
    # Class attributes are the per-thread defaults: outside a render (compiling,
    # module import) there is no deadline.
    deadline = math.inf
    emitted = 0
    built = 0  # bytes charged by _charge
    inline = False  # on the event loop: big calls leave for a worker (NeedsMoreTime)
    until = math.inf  # the budget's end; `deadline` is the next check instant, <= until
    turn = False  # this thread holds _TURNS


_state = _RenderState()

# Renders off the event loop take turns of _TURN_SECONDS: render threads share the GIL with
# the event loop, and with four of them busy the loop waited for it for up to 1.9 s
# (tests/test_hostile_templates.py); taking turns, it competes with one at a time.
_TURNS = threading.Lock()
_TURN_SECONDS = 0.005


def _late() -> None:
    """The check instant passed: the budget is spent, or this render's turn is over."""
    state = _state
    if not state.turn or monotonic() > state.until:
        raise _OutOfTime
    _TURNS.release()
    state.turn = False
    sleep(0)  # let a waiting render take the lock
    _take_turn()


def _take_turn() -> None:
    state = _state
    if not _TURNS.acquire(timeout=max(0.0, state.until - monotonic())):
        raise _OutOfTime
    state.turn = True
    state.deadline = min(state.until, monotonic() + _TURN_SECONDS)


def _give_turn() -> None:
    if _state.turn:
        _state.turn = False
        _TURNS.release()


def _tick() -> None:
    if monotonic() > _state.deadline:
        _late()


def _refuse(what: str) -> None:
    raise SecurityError(f"{what} would exceed the size limit")


def _footprint(value) -> int:
    """Roughly the bytes a value holds itself (its slots, not the objects they point to)."""
    if isinstance(value, str):
        return len(value) if value.isascii() else 4 * len(value)
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if isinstance(value, (list, tuple)):
        return 8 * len(value) + 56
    if isinstance(value, (dict, set, frozenset)):
        return 64 * len(value) + 64
    return 0


def _charge(nbytes: int) -> None:
    """Count what the render built against its memory allowance."""
    state = _state
    state.built += nbytes
    if state.built > _MAX_RENDER_BYTES:
        _refuse("the values built by this render")


def _sized(value, what: str, items_cap: int, chars_cap: int, chars_inline: int) -> None:
    """Refuse an input too large for one call; in the inline pass, leave for a worker."""
    if isinstance(value, (str, bytes)):
        n, cap, inline = len(value), chars_cap, chars_inline
    elif isinstance(value, Sized) and not isinstance(value, jinja2.Undefined):
        n, cap, inline = len(value), items_cap, _INLINE_ITEMS
    else:
        return
    if n > cap:
        _refuse(what)
    if n > inline and _state.inline:
        raise _OutOfTime


def _counted(iterator, what: str):
    """Pass a filter's lazy output through: deadline per item, at most _MAX_ITEMS of them."""
    state = _state
    count = 0
    for item in iterator:
        count += 1
        if count > _MAX_ITEMS:
            _refuse(what)
        if state.inline and count > _INLINE_ITEMS:
            raise _OutOfTime
        if monotonic() > state.deadline:
            _late()
        # batch and slice make a new list per item; other items exist already.
        _charge(8 + (8 * len(item) if type(item) is list else 0))
        yield item


def _built(result, source, what: str):
    """Check and charge a call's result; lazy results are counted as they are consumed."""
    if result is source:
        return result
    if isinstance(result, (str, bytes)):
        if len(result) > _MAX_BUILT_CHARS:
            _refuse(what)
    elif isinstance(result, (list, tuple, dict, set, frozenset)):
        if len(result) > _MAX_ITEMS:
            _refuse(what)
    elif isinstance(result, Iterator):
        return _counted(result, what)
    else:
        return result
    _charge(_footprint(result))
    return result


# ---------------------------------------------------------------- size estimates

_CONTAINERS = (list, tuple, dict, set, frozenset)


class _Leave:
    # Marks, on the walk's stack, the end of a container's children.
    __slots__ = ("key",)

    def __init__(self, key: int):
        self.key = key


def _scalar_size(value) -> int:
    if isinstance(value, (str, bytes)):
        return len(value) + 3  # quotes and separator
    if isinstance(value, int):
        return value.bit_length() // 3 + 3  # decimal digits, generously
    return 24


def _text_size(value) -> int:
    """Roughly len(str(value)), stopping once it is past the limit.

    Containers are walked because their str() repeats shared references: a list
    holding one 10 MB string a thousand times prints as 10 GB. A container inside
    itself prints as [...], so it is counted once.
    """
    if isinstance(value, str):
        return len(value)
    if not isinstance(value, _CONTAINERS):
        return _scalar_size(value)
    # On the event loop a long walk is itself the stall: leave for a worker instead.
    limit = _INLINE_CHARS if _state.inline else _MAX_BUILT_CHARS
    total, pending, open_ids = 0, [value], set()
    while pending:
        item = pending.pop()
        if isinstance(item, _Leave):
            open_ids.discard(item.key)
            continue
        key = id(item)
        if key in open_ids:
            total += 5
            continue
        if limit < _MAX_BUILT_CHARS and len(item) > _INLINE_ITEMS:
            raise _OutOfTime
        open_ids.add(key)
        pending.append(_Leave(key))
        total += 2
        children = itertools.chain(item.keys(), item.values()) if isinstance(item, dict) else item
        for child in children:
            # The common kinds first, by exact type: this loop sees every leaf.
            kind = type(child)
            if kind is int:
                total += 4 if -1000 < child < 1000 else child.bit_length() // 3 + 3
            elif kind is str:
                total += len(child) + 4
            elif isinstance(child, _CONTAINERS):
                pending.append(child)
            else:
                total += _scalar_size(child)
        if total > limit:
            if limit < _MAX_BUILT_CHARS:
                raise _OutOfTime
            return total
        _tick()
    return total


def _check_text(value, what: str) -> None:
    if not isinstance(value, str) and _text_size(value) > _MAX_BUILT_CHARS:
        _refuse(what)


def _check_width(width, what: str) -> None:
    if isinstance(width, int) and width > _MAX_BUILT_CHARS:
        _refuse(what)


def _number(digits: str) -> int:
    # int() of a huge digit run would itself raise; anything this long is too wide.
    return int(digits) if len(digits) <= 9 else _MAX_BUILT_CHARS + 1


_PERCENT_FIELD = re.compile(r"%(?:\(([^)]*)\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d*))?[hlL]?(.?)", re.S)


def _check_percent(fmt, args) -> None:
    """Refuse printf-style formatting whose widths or repeated arguments are too large."""
    if not isinstance(fmt, str):
        return
    positional = args if isinstance(args, tuple) else (args,)
    named = args if isinstance(args, Mapping) else None
    index = 0
    total = len(fmt)

    def take(field):
        nonlocal index
        if field == "*":
            value = positional[index] if index < len(positional) else 0
            index += 1
            return value if isinstance(value, int) else 0
        return _number(field) if field else 0

    for key, width, precision, kind in _PERCENT_FIELD.findall(fmt):
        if kind == "%":
            continue
        need = max(take(width), take(precision))
        if key and named is not None:
            value = named.get(key)
        else:
            value = positional[index] if index < len(positional) else None
            index += 1
        total += max(need, _text_size(value))
        if total > _MAX_BUILT_CHARS:
            _refuse("the formatted string")


_SPEC_NUMBER = re.compile(r"\d+")


class _SizeLimitedFields:
    """Mixin for the sandbox's str.format formatters: refuse huge widths and results."""

    _produced = 0

    def format_field(self, value, format_spec):
        need = max((_number(d) for d in _SPEC_NUMBER.findall(format_spec)), default=0)
        self._produced += max(need, _text_size(value))
        if self._produced > _MAX_BUILT_CHARS:
            _refuse("the formatted string")
        return super().format_field(value, format_spec)


class _Formatter(_SizeLimitedFields, SandboxedFormatter):
    pass


class _EscapeFormatter(_SizeLimitedFields, SandboxedEscapeFormatter):
    pass


def _replace_size(text, old, new, count) -> int:
    if not (isinstance(text, (str, bytes)) and isinstance(old, type(text)) and isinstance(new, type(text))):
        return 0
    hits = text.count(old) if old else len(text) + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(text) + hits * (len(new) - len(old))


# Methods reached through the sandbox's call() whose result can be a product of
# their inputs (width, count, repetition) rather than a sum.
_SIZED_METHODS = frozenset(
    {"ljust", "rjust", "center", "zfill", "expandtabs", "replace", "join", "translate", "extend", "to_bytes"}
)


def _guard_method(method, name: str, args: tuple, kwargs: dict) -> tuple:
    """Refuse a call whose result would be too large; may return materialised args."""
    owner = getattr(method, "__self__", None)
    first = args[0] if args else None
    if isinstance(owner, (str, bytes)):
        if name in ("ljust", "rjust", "center", "zfill"):
            _check_width(first, f"str.{name}()")
        elif name == "expandtabs":
            tabsize = first if args else kwargs.get("tabsize", 8)
            tab = "\t" if isinstance(owner, str) else b"\t"
            if isinstance(tabsize, int) and len(owner) + owner.count(tab) * tabsize > _MAX_BUILT_CHARS:
                _refuse("str.expandtabs()")
        elif name == "replace" and len(args) >= 2:
            count = args[2] if len(args) > 2 else kwargs.get("count", -1)
            if _replace_size(owner, args[0], args[1], count) > _MAX_BUILT_CHARS:
                _refuse("str.replace()")
        elif name == "join" and args:
            items = list(itertools.islice(iter(first), _MAX_BUILT_ITEMS + 1))
            if len(items) > _MAX_BUILT_ITEMS:
                _refuse("str.join()")
            size = len(owner) * max(len(items) - 1, 0)
            for item in items:
                size += _text_size(item)
                if size > _MAX_BUILT_CHARS:
                    _refuse("str.join()")
            return (items, *args[1:])
        elif name == "translate" and isinstance(first, Mapping):
            longest = max((len(v) for v in first.values() if isinstance(v, (str, bytes))), default=1)
            if len(owner) * longest > _MAX_BUILT_CHARS:
                _refuse("str.translate()")
    elif isinstance(owner, list) and name == "extend" and args:
        room = _MAX_BUILT_ITEMS - len(owner)
        items = first if hasattr(first, "__len__") else list(itertools.islice(iter(first), max(room, 0) + 1))
        if len(items) > room:
            _refuse("list.extend()")
        return (items, *args[1:])
    elif isinstance(owner, int) and name == "to_bytes":
        _check_width(first if args else kwargs.get("length", 1), "int.to_bytes()")
    return args


# Methods that read or select, in constant time or one scan, and build nothing large.
_ACCESS_METHODS = frozenset(
    {
        "get", "pop", "popitem", "keys", "values", "items", "index", "count", "find", "rfind",
        "startswith", "endswith", "isdigit", "isalpha", "isalnum", "isspace", "islower", "isupper",
        "isnumeric", "isdecimal", "isidentifier", "isascii", "istitle", "__contains__", "__len__",
    }
)
# Methods that keep their arguments: what a render stores this way is charged.
_STORING_METHODS = frozenset({"append", "insert", "add", "update", "setdefault", "__setitem__"})
# Methods that build a list from their owner.
_LISTING_METHODS = frozenset({"split", "rsplit", "splitlines", "sort"})
_LINE_BREAKS = ("\n", "\r", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029")


def _guard_listing(owner, name: str, args: tuple, kwargs: dict) -> None:
    """Refuse a split or sort whose list would be too long, counting pieces in C first."""
    if name == "sort":
        if isinstance(owner, list) and len(owner) > _MAX_ITEMS:
            _refuse("list.sort()")
        if isinstance(owner, list) and len(owner) > _INLINE_ITEMS and _state.inline:
            raise _OutOfTime
        return
    if not isinstance(owner, (str, bytes)) or len(owner) <= _MAX_ITEMS:
        return
    if name == "splitlines":
        pieces = sum(owner.count(c) for c in _LINE_BREAKS) if isinstance(owner, str) else owner.count(b"\n") + owner.count(b"\r")
    else:
        sep = args[0] if args else kwargs.get("sep")
        limit = args[1] if len(args) > 1 else kwargs.get("maxsplit", -1)
        if sep is None:
            # Runs of whitespace separate; at worst every other character is one.
            pieces = len(owner) // 2 + 1
        else:
            pieces = owner.count(sep) + 1 if sep else 0
        if isinstance(limit, int) and limit >= 0:
            pieces = min(pieces, limit + 1)
    if pieces > _MAX_ITEMS:
        _refuse(f"str.{name}()")


def _check_binop(operator: str, left, right) -> None:
    if operator == "*":
        if isinstance(left, int) and isinstance(right, int):
            if left.bit_length() + right.bit_length() > _MAX_INT_BITS:
                _refuse("the product")
            return
        if isinstance(right, int) and isinstance(left, (str, bytes, list, tuple)):
            seq, times = left, right
        elif isinstance(left, int) and isinstance(right, (str, bytes, list, tuple)):
            seq, times = right, left
        else:
            return
        limit = _MAX_BUILT_CHARS if isinstance(seq, (str, bytes)) else _MAX_BUILT_ITEMS
        if times > 1 and len(seq) * times > limit:
            _refuse("the repetition")
    elif operator == "**":
        if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            if left.bit_length() * right > _MAX_INT_BITS:
                _refuse("the power")
    elif operator == "+":
        if isinstance(left, (str, bytes)) and isinstance(right, (str, bytes)):
            if len(left) + len(right) > _MAX_BUILT_CHARS:
                _refuse("the sum")
        elif isinstance(left, (list, tuple)) and isinstance(right, (list, tuple)):
            if len(left) + len(right) > _MAX_BUILT_ITEMS:
                _refuse("the sum")
    elif operator == "%":
        _check_percent(left, right)


# ---------------------------------------------------------------- the sandbox


class _Sandbox(SandboxedEnvironment):
    """OnCall's sandbox, with deadline checks and size limits on the amplifying operations."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call_binop(self, context, operator, left, right):
        _tick()
        _check_binop(operator, left, right)
        result = self.binop_table[operator](left, right)
        if _state.inline and _footprint(result) > _INLINE_CHARS:
            raise _OutOfTime
        _charge(_footprint(result))
        return result

    def getattr(self, obj, attribute):
        if monotonic() > _state.deadline:
            _late()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        if monotonic() > _state.deadline:
            _late()
        if type(argument) is slice:  # a copy: charged, as a recursion can keep one per level
            return _built(super().getitem(obj, argument), obj, "the slice")
        return super().getitem(obj, argument)

    def call(self, context, obj, /, *args, **kwargs):
        # Every macro call, loop(...) recursion and method call passes here.
        if monotonic() > _state.deadline:
            _late()
        name = getattr(obj, "__name__", None)
        owner = getattr(obj, "__self__", None)
        if owner is None or isinstance(owner, types.ModuleType) or name in _ACCESS_METHODS:
            # A macro, or a method that reads or selects: nothing of its size to bound.
            return super().call(context, obj, *args, **kwargs)
        # A method of a value: bounded like a filter over that value.
        _sized(owner, f"{type(owner).__name__}.{name}()", _MAX_BUILT_ITEMS, _MAX_BUILT_CHARS, _INLINE_CHARS)
        if name in _SIZED_METHODS:
                args = _guard_method(obj, name, args, kwargs)
        elif name in _LISTING_METHODS:
            _guard_listing(owner, name, args, kwargs)
        elif name in _STORING_METHODS:
            for arg in itertools.chain(args, kwargs.values()):
                _charge(_footprint(arg) + 16)
        return _built(super().call(context, obj, *args, **kwargs), owner, f"the result of {name}()")

    def wrap_str_format(self, value):
        # Same role as Jinja's own hook, with size-limited formatters.
        if not isinstance(value, (types.MethodType, types.BuiltinMethodType)):
            return None
        if value.__name__ not in ("format", "format_map"):
            return None
        owner = value.__self__
        if not isinstance(owner, str):
            return None
        by_map = value.__name__ == "format_map"
        env = self

        def sandboxed_format(*args, **kwargs):
            if by_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one argument")
                args, kwargs = (), args[0]
            if isinstance(owner, Markup):
                formatter = _EscapeFormatter(env, escape=owner.escape)
            else:
                formatter = _Formatter(env)
            return type(owner)(formatter.vformat(owner, args, kwargs))

        return sandboxed_format


# ---------------------------------------------------------------- OnCall's filters

_EXPECTED = (ValueError, AttributeError, TypeError)


def _tojson_pretty(value):
    try:
        return json.dumps(value, sort_keys=True, indent=4, separators=(",", ": "), ensure_ascii=False)
    except _EXPECTED:
        return None


def _json_dumps(value):
    try:
        return json.dumps(value)
    except _EXPECTED:
        return None


def _parse_json(value):
    try:
        return json.loads(value)
    except _EXPECTED:
        return None


def _b64decode(value):
    try:
        return base64.b64decode(value).decode("utf-8")
    except _EXPECTED:
        return None


def _with_regex_timeout(run):
    """Run a regex call under min(2 s, the remaining budget).

    A timeout that the budget imposed ends the render; OnCall's own 2 s timeout gives None.
    """
    state = _state
    remaining = state.until - monotonic()
    if remaining <= 0:
        raise _OutOfTime
    timeout = min(_REGEX_TIMEOUT, remaining)
    # The match runs without the GIL (concurrent=True): other renders may go meanwhile.
    had_turn = state.turn
    _give_turn()
    try:
        return run(timeout)
    except TimeoutError:
        if timeout < _REGEX_TIMEOUT:
            raise _OutOfTime from None
        return None
    except _EXPECTED:  # regex.error (an invalid pattern) is not among these: a Template Error
        return None
    finally:
        if had_turn:
            _take_turn()


# pass_context keeps Jinja from folding regex calls on constants at compile time,
# where no budget applies.
@pass_context
def _regex_replace(context, value, find, replace):
    def run(timeout):
        if (len(value) + 1) * (2 * len(replace) + 1) <= _MAX_BUILT_CHARS:
            return regex.sub(find, replace, value, timeout=timeout, concurrent=True)
        produced = 0

        def counted(match):
            nonlocal produced
            piece = match.expand(replace)
            produced += len(piece)
            if produced > _MAX_BUILT_CHARS:
                _refuse("regex_replace")
            return piece

        return regex.sub(find, counted, value, timeout=timeout, concurrent=True)

    return _with_regex_timeout(run)


@pass_context
def _regex_match(context, value, pattern):
    return _with_regex_timeout(lambda timeout: bool(regex.match(pattern, value, timeout=timeout, concurrent=True)))


@pass_context
def _regex_search(context, value, pattern):
    return _with_regex_timeout(lambda timeout: bool(regex.search(pattern, value, timeout=timeout, concurrent=True)))


def _range(*args):
    raise SecurityError("use of 'range' is restricted")


# ---------------------------------------------------------------- guards on built-in filters


def _guarded_builtins(builtin: dict) -> dict:
    """Jinja's filters that can build a value far larger than their input, made to refuse."""

    def center(value, width=80):
        _check_width(width, "center")
        return builtin["center"](value, width)

    def indent(s, width=4, first=False, blank=False):
        text = str(s)
        step = len(width) if isinstance(width, str) else width
        if isinstance(step, int) and len(text) + (text.count("\n") + 1) * step > _MAX_BUILT_CHARS:
            _refuse("indent")
        return builtin["indent"](s, width, first, blank)

    @pass_environment
    def wordwrap(environment, s, width=79, break_long_words=True, wrapstring=None, break_on_hyphens=True):
        _check_width(width, "wordwrap")
        wrap = environment.newline_sequence if wrapstring is None else wrapstring
        text = str(s)
        if isinstance(wrap, str) and len(text) + (len(text) + 1) * len(wrap) > _MAX_BUILT_CHARS:
            _refuse("wordwrap")
        return builtin["wordwrap"](environment, s, width, break_long_words, wrapstring, break_on_hyphens)

    @pass_eval_context
    def replace(eval_ctx, s, old, new, count=None):
        if _replace_size(str(s), str(old), str(new), count) > _MAX_BUILT_CHARS:
            _refuse("replace")
        return builtin["replace"](eval_ctx, s, old, new, count)

    def format(value, *args, **kwargs):
        _check_percent(str(value), kwargs or args)
        return builtin["format"](value, *args, **kwargs)

    @pass_eval_context
    def join(eval_ctx, value, d="", attribute=None):
        items = list(itertools.islice(iter(value), _MAX_ITEMS + 1))
        if len(items) > _MAX_ITEMS:
            _refuse("join")
        if attribute is not None:
            get = make_attrgetter(eval_ctx.environment, attribute)
            items = [get(item) for item in items]
        size = _text_size(d) * max(len(items) - 1, 0)
        for item in items:
            size += _text_size(item)
            if size > _MAX_BUILT_CHARS:
                _refuse("join")
        return builtin["join"](eval_ctx, items, d)

    def batch(value, linecount, fill_with=None):
        if fill_with is not None and isinstance(linecount, int) and linecount > _MAX_BUILT_ITEMS:
            _refuse("batch")
        return builtin["batch"](value, linecount, fill_with)

    @pass_eval_context
    def slice_(eval_ctx, value, slices, fill_with=None):
        # Jinja's slice takes the eval context first (it is an async variant).
        if isinstance(slices, int) and slices > _MAX_ITEMS:
            _refuse("slice")
        return builtin["slice"](eval_ctx, value, slices, fill_with)

    def pprint(value):
        # pformat works in Python with no deadline checks: keep its input small.
        if _text_size(value) > _MAX_WORDWISE_CHARS:
            _refuse("pprint")
        return builtin["pprint"](value)

    @pass_environment
    def sum_(environment, iterable, attribute=None, start=0):
        if not isinstance(start, (list, tuple)):
            return builtin["sum"](environment, iterable, attribute, start)
        # Summing sequences concatenates them: do it step by step under the '+' limit.
        get = make_attrgetter(environment, attribute) if attribute is not None else None
        total = start
        for item in iterable:
            _tick()
            item = get(item) if get else item
            _check_binop("+", total, item)
            total = total + item
        return total

    return {
        "center": center,
        "indent": indent,
        "wordwrap": wordwrap,
        "replace": replace,
        "format": format,
        "join": join,
        "batch": batch,
        "slice": slice_,
        "pprint": pprint,
        "sum": sum_,
    }


# Filters that stringify their input: a container of shared references prints far larger.
_STRINGIFYING = frozenset(
    {
        "string", "pprint", "tojson", "tojson_pretty", "json_dumps", "upper", "lower",
        "capitalize", "title", "trim", "striptags", "escape", "e", "forceescape", "urlencode",
        "urlize", "truncate", "wordcount", "safe", "xmlattr", "center", "indent", "wordwrap",
        "replace", "format", "b64decode", "regex_replace", "regex_match", "regex_search",
    }
)


# Filters that walk their input item by item (a string: character by character).
_ITERATING = frozenset(
    {
        "list", "sort", "unique", "batch", "slice", "map", "select", "reject", "selectattr",
        "rejectattr", "join", "last", "min", "max", "sum", "groupby", "dictsort", "random", "items",
    }
)
# Filters that work word by word (or value by value) in Python.
_WORDWISE = frozenset(
    {"wordwrap", "wordcount", "urlize", "indent", "title", "urlencode", "striptags", "xmlattr", "pprint"}
)
# parse_json is one C call, but its objects grow with its input: ~15 ms and 30 MB at 1M.
_MAX_JSON_CHARS = 1_000_000
# Filters whose result is one of their input's elements: nothing new to charge.
_SELECTING = frozenset({"first", "last", "random", "min", "max", "attr", "default", "d"})
# Constant time whatever the input.
_FREE = frozenset({"length", "count", "default", "d", "first", "attr", "safe"})


def _paced(func, name: str, text_checked: bool):
    """A filter with the deadline, input and output limits and the inline rule applied."""
    value_at = 0 if getattr(func, "jinja_pass_arg", None) is None else 1
    what = f"the input of {name}"
    if name in _ITERATING:
        caps = (_MAX_ITEMS, _MAX_ITEMS, _INLINE_ITEMS)
    elif name in _WORDWISE:
        caps = (_MAX_ITEMS, _MAX_WORDWISE_CHARS, _INLINE_ITEMS)
    elif name == "parse_json":
        caps = (_MAX_ITEMS, _MAX_JSON_CHARS, _INLINE_ITEMS)
    else:
        caps = (_MAX_ITEMS, _MAX_BUILT_CHARS, _INLINE_CHARS)
    free = name in _FREE
    selecting = name in _SELECTING

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        _tick()
        value = args[value_at] if len(args) > value_at else None
        if not free:
            _sized(value, what, *caps)
        if text_checked:
            _check_text(value, what)
        result = func(*args, **kwargs)
        return result if selecting else _built(result, value, f"the output of {name}")

    return wrapper


def _paced_test(func):
    """A test with the deadline applied (tests are constant time, or one C scan: `in`)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        _tick()
        return func(*args, **kwargs)

    return wrapper


# ---------------------------------------------------------------- filters the AST rewrite inserts


@pass_context
def _paced_iter(context, iterable):
    state = _state
    for item in iterable:
        if monotonic() > state.deadline:
            _late()
        yield item


@pass_context
def _emit(context, value):
    text = value if isinstance(value, str) else None
    if text is None:
        if _state.inline and isinstance(value, Sized) and len(value) > _INLINE_ITEMS:
            raise _OutOfTime
        _check_text(value, "the output")
        text = str(value)
    state = _state
    state.emitted += len(text)
    if state.emitted > _MAX_EMITTED_CHARS:
        _refuse("the rendered output")
    if monotonic() > state.deadline:
        _late()
    return text


def _concat(parts):
    size = 0
    for part in parts:
        size += _text_size(part)
        if size > _MAX_BUILT_CHARS:
            _refuse("the concatenation")
    if size > _INLINE_CHARS and _state.inline:
        raise _OutOfTime
    text = "".join([part if isinstance(part, str) else str(part) for part in parts])
    _charge(_footprint(text))
    return text


def _checkpoint(value):
    # After each comparison: `x in big_list or x in big_list or …` is all C code otherwise.
    _tick()
    return value


def _build_environment() -> _Sandbox:
    env = _Sandbox(
        loader=jinja2.BaseLoader(),
        autoescape=False,
        keep_trailing_newline=False,
        # No compile-time folding: it would run filters on constants with no budget.
        optimized=False,
    )
    env.globals.pop("lipsum", None)
    env.globals["range"] = _range
    env.globals["time"] = timefilters.now
    builtin = dict(env.filters)
    env.filters.update(_guarded_builtins(builtin))
    env.filters.update(
        tojson_pretty=_tojson_pretty,
        json_dumps=_json_dumps,
        parse_json=_parse_json,
        b64decode=_b64decode,
        iso8601_to_time=timefilters.iso8601_to_time,
        datetimeformat=timefilters.datetimeformat,
        datetimeformat_as_timezone=timefilters.datetimeformat_as_timezone,
        datetimeparse=timefilters.datetimeparse,
        timedeltaparse=timefilters.timedeltaparse,
        timestamp_to_datetime=timefilters.timestamp_to_datetime,
        regex_replace=_regex_replace,
        regex_match=_regex_match,
        regex_search=_regex_search,
    )
    for name, func in list(env.filters.items()):
        env.filters[name] = _paced(func, name, name in _STRINGIFYING)
    for name, func in list(env.tests.items()):
        env.tests[name] = _paced_test(func)
    env.filters.update(
        _tocsin_paced_iter=_paced_iter,
        _tocsin_emit=_emit,
        _tocsin_concat=_concat,
        _tocsin_checkpoint=_checkpoint,
    )
    return env


_ENV = _build_environment()
_GLOBALS = dict(_ENV.globals)


def _through(filter_name: str, expr: nodes.Expr) -> nodes.Filter:
    return nodes.Filter(expr, filter_name, [], [], None, None, lineno=expr.lineno)


class _Pacer(NodeTransformer):
    """Routes loops, outputs, `~` and comparisons through the budget and size checks."""

    def visit_For(self, node):
        self.generic_visit(node)
        node.iter = _through("_tocsin_paced_iter", node.iter)
        return node

    def visit_Output(self, node):
        self.generic_visit(node)
        node.nodes = [_through("_tocsin_emit", child) for child in node.nodes]
        return node

    def visit_Concat(self, node):
        self.generic_visit(node)
        return _through("_tocsin_concat", nodes.Tuple(node.nodes, "load", lineno=node.lineno))

    def visit_Compare(self, node):
        self.generic_visit(node)
        return _through("_tocsin_checkpoint", node)


# ---------------------------------------------------------------- public interface


@functools.lru_cache(maxsize=1024)
def compile_template(source: str) -> jinja2.Template:
    """Compile a user template once; the result renders many times, from any thread.

    Memoized by text: config checking and building compile the same texts, every
    integration of a kind shares its defaults, and a reload or a preview recompiles
    them all (the Alertmanager message alone takes ~18 ms). Failures are not cached."""
    if len(source) > MAX_TEMPLATE_LENGTH:
        raise TemplateCompileError(f"Template exceeds length limit ({len(source)} > {MAX_TEMPLATE_LENGTH})")
    try:
        tree = _Pacer().visit(_ENV.parse(source))
        tree.set_environment(_ENV)
        return _ENV.from_string(tree)
    except TemplateSyntaxError as exc:
        raise TemplateCompileError(f"line {exc.lineno}: {exc.message}") from None
    except (RecursionError, SyntaxError, MemoryError) as exc:
        # Python's own compiler refuses some deeply nested expressions.
        raise TemplateCompileError(f"template too complex to compile: {exc}") from None


def render(template: jinja2.Template | NativeTemplate, variables: dict, budget: Budget, *,
           title: bool = False) -> Outcome:
    """Render under a budget; errors become OnCall's "Template Error/Warning: …" texts."""
    if type(template) is NativeTemplate:
        try:
            text = template.native(variables)
        except Exception:  # Declined, or anything unforeseen: the sandbox decides
            template = template.sandboxed
        else:
            return Outcome(_cut(text, title), None)
    state = _state
    saved = state.deadline, state.until, state.emitted, state.built, state.inline, state.turn
    state.deadline = state.until = budget.deadline
    state.emitted, state.built, state.inline, state.turn = 0, 0, budget.escalate, False
    try:
        if not budget.escalate and not saved[-1]:
            _take_turn()  # off the event loop: take turns with the other renders
        # Template.render would walk the environment's globals ChainMap twice per call (a
        # third of a small render's cost); a shared context over one merged dict gives
        # templates the same names.
        context = new_context(_ENV, template.name, template.blocks, {**_GLOBALS, **variables}, True)
        text = _ENV.concat(template.root_render_func(context))
    except _OutOfTime:
        if budget.escalate:
            raise NeedsMoreTime from None
        return Outcome(None, f"Template Error: render exceeded its time budget of {budget.seconds} s")
    except (TypeError, KeyError, ValueError, UndefinedError) as exc:
        return Outcome(None, f"Template Warning: {exc}")
    except Exception as exc:
        return Outcome(None, f"Template Error: {exc}")
    finally:
        if not saved[-1]:
            _give_turn()
        state.deadline, state.until, state.emitted, state.built, state.inline, state.turn = saved
    return Outcome(_cut(text, title), None)


def _cut(text: str, title: bool) -> str:
    limit = MAX_TITLE_LENGTH if title else MAX_RESULT_LENGTH
    return text[:limit] + ".." if len(text) > limit else text


_TRUE_TEXTS = frozenset({"1", "true", "ok"})


def is_truthy(outcome: Outcome) -> bool:
    """Grafana OnCall's condition rule: no error, and the stripped text is 1, true or ok."""
    return outcome.error is None and outcome.text is not None and outcome.text.strip().lower() in _TRUE_TEXTS


def render_budget(seconds: float, escalate_after: float | None = None) -> Budget:
    """A budget starting now; with escalate_after, the first stretch raises NeedsMoreTime."""
    now = monotonic()
    if escalate_after is None:
        return Budget(now + seconds, False, seconds)
    return Budget(now + escalate_after, True, seconds)
