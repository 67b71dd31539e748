"""Constrained decoding for JSON replies: which texts can still become a JSON value that a schema accepts.

``response_format`` ``json_object`` (any JSON object), ``json_schema`` and a forced ``tool_choice``
ask for a reply that parses. The engine (:mod:`mlx_lora.inference.engine`) asks :meth:`JsonConstraint.check`
about the reply so far plus each candidate token's text and only takes tokens that keep it a
valid prefix, which is sampling from the logits with every other token masked out. The reply
must also end: strings, keys, numbers, arrays, objects, whitespace and nesting are bounded, and
``check`` reports how many characters the shortest completion still needs, so that when the
token budget runs short the engine takes only tokens that bring the end nearer.

The schema subset: ``type`` object (``properties``, ``required``; with properties, only those
keys), array (``items``, ``minItems``, ``maxItems``), string (``enum``, ``maxLength``), number,
integer, boolean, null; ``enum`` and ``const`` of JSON values; ``anyOf`` / ``oneOf``; ``{}`` for
any value. Anything else is refused by :func:`schema_problem` before a request is queued.
"""

from __future__ import annotations

import json
from typing import Optional

MAX_STRING = 512
MAX_KEY = 64
MAX_ITEMS = 64
MAX_KEYS = 64
MAX_DEPTH = 12
MAX_SPACE = 4
MAX_NUMBER = 24

_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}
_KNOWN = {
    "type",
    "properties",
    "required",
    "items",
    "enum",
    "const",
    "anyOf",
    "oneOf",
    "minItems",
    "maxItems",
    "maxLength",
    "additionalProperties",
    "description",
    "title",
    "default",
    "$schema",
    "strict",
    "examples",
    "minLength",
    "minimum",
    "maximum",
    "format",
    "name",
}


def schema_problem(schema, where: str = "schema", depth: int = 0) -> Optional[str]:
    """None when constrained decoding supports ``schema``, else what it does not support."""
    if depth > MAX_DEPTH:
        return f"{where}: nested more than {MAX_DEPTH} deep"
    if not isinstance(schema, dict):
        return f"{where} must be an object"
    unknown = sorted(k for k in schema if k not in _KNOWN)
    if unknown:
        return (
            f"{where}: unsupported keyword {unknown[0]!r} (supported: type, properties, required, items, enum, "
            f"const, anyOf, oneOf, minItems, maxItems, maxLength)"
        )
    t = schema.get("type")
    types = t if isinstance(t, list) else [t] if t is not None else []
    if any(x not in _TYPES for x in types):
        return f"{where}.type: {t!r} is not a JSON type"
    for key in ("anyOf", "oneOf"):
        if key in schema:
            if not isinstance(schema[key], list) or not schema[key]:
                return f"{where}.{key} must be a non-empty list"
            for i, s in enumerate(schema[key]):
                p = schema_problem(s, f"{where}.{key}[{i}]", depth + 1)
                if p:
                    return p
    if "enum" in schema and (not isinstance(schema["enum"], list) or not schema["enum"]):
        return f"{where}.enum must be a non-empty list"
    props = schema.get("properties")
    if props is not None:
        if not isinstance(props, dict):
            return f"{where}.properties must be an object"
        for k, s in props.items():
            p = schema_problem(s, f"{where}.properties.{k}", depth + 1)
            if p:
                return p
    req = schema.get("required")
    if req is not None and (not isinstance(req, list) or not all(isinstance(r, str) for r in req)):
        return f"{where}.required must be a list of names"
    if req and props is not None and any(r not in props for r in req):
        return f"{where}.required names a key missing from properties"
    if "items" in schema:
        p = schema_problem(schema["items"], f"{where}.items", depth + 1)
        if p:
            return p
    for k in ("minItems", "maxItems", "maxLength"):
        v = schema.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            return f"{where}.{k} must be a non-negative integer"
    return None


class _End(Exception):
    """The text ended inside a value; ``need`` characters at least complete it."""

    def __init__(self, need: int):
        self.need = need


class _Bad(Exception):
    """The text cannot become a value the schema accepts."""


def _types(schema: dict) -> set:
    t = schema.get("type")
    if t is None:
        return set(_TYPES) - {"integer"}
    return set(t) if isinstance(t, list) else {t}


def min_len(schema: dict) -> int:
    """Characters of the shortest JSON text ``schema`` accepts."""
    if "const" in schema:
        return len(json.dumps(schema["const"]))
    if "enum" in schema:
        return min(len(json.dumps(v)) for v in schema["enum"])
    alts = schema.get("anyOf") or schema.get("oneOf")
    if alts:
        return min(min_len(a) for a in alts)
    best = []
    for t in _types(schema):
        if t in ("number", "integer"):
            best.append(1)
        elif t in ("boolean", "null"):
            best.append(4)
        elif t == "string":
            best.append(2)
        elif t == "array":
            k = schema.get("minItems", 0)
            best.append(2 + (k * (min_len(schema.get("items", {})) + 1) if k else 0))
        elif t == "object":
            props = schema.get("properties") or {}
            req = schema.get("required") or []
            best.append(2 + sum(len(json.dumps(r)) + 2 + min_len(props.get(r, {})) for r in req))
    return min(best)


class _Parser:
    def __init__(self, text: str):
        self.s = text
        self.i = 0

    def peek(self) -> Optional[str]:
        return self.s[self.i] if self.i < len(self.s) else None

    def space(self, need: int) -> None:
        n = 0
        while self.i < len(self.s) and self.s[self.i] in " \n\r\t":
            self.i += 1
            n += 1
            if n > MAX_SPACE:
                raise _Bad
        if self.i >= len(self.s):
            raise _End(need)

    def value(self, schema: dict, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise _Bad
        self.space(min_len(schema))
        if "const" in schema or "enum" in schema:
            return self.literal(
                [
                    json.dumps(v, ensure_ascii=False)
                    for v in ([schema["const"]] if "const" in schema else schema["enum"])
                ]
            )
        alts = schema.get("anyOf") or schema.get("oneOf")
        if alts:
            return self.any_of(alts, depth)
        c = self.s[self.i]
        types = _types(schema)
        if c == "{" and "object" in types:
            return self.object(schema, depth)
        if c == "[" and "array" in types:
            return self.array(schema, depth)
        if c == '"' and "string" in types:
            return self.string(schema.get("maxLength", MAX_STRING))
        if (c == "-" or c.isdigit()) and types & {"number", "integer"}:
            return self.number("number" not in types)
        if c in "tf" and "boolean" in types:
            return self.literal(["true", "false"])
        if c == "n" and "null" in types:
            return self.literal(["null"])
        raise _Bad

    def any_of(self, alts: list, depth: int) -> None:
        start, needs, ends = self.i, [], []
        for a in alts:
            self.i = start
            try:
                self.value(a, depth)
                ends.append(self.i)
            except _End as e:
                needs.append(e.need)
            except _Bad:
                pass
        if ends:
            self.i = ends[0]
            return
        if needs:
            raise _End(min(needs))
        raise _Bad

    def literal(self, options: list[str]) -> None:
        rest = self.s[self.i :]
        done = [o for o in options if rest.startswith(o)]
        if done:
            self.i += len(max(done, key=len))
            return
        part = [o for o in options if o.startswith(rest)]
        if part:
            raise _End(min(len(o) - len(rest) for o in part))
        raise _Bad

    def string(self, limit: int, choices: Optional[list] = None) -> str:
        """A string; returns its value. ``choices``: the value must be one of them."""
        assert self.s[self.i] == '"'
        self.i += 1
        out = []
        while True:
            if self.i >= len(self.s):
                value = "".join(out)
                if choices is not None:
                    rests = [len(c) - len(value) for c in choices if c.startswith(value)]
                    if not rests:
                        raise _Bad
                    raise _End(min(rests) + 1)
                raise _End(1)
            c = self.s[self.i]
            if c == '"':
                self.i += 1
                value = "".join(out)
                if choices is not None and value not in choices:
                    raise _Bad
                return value
            if c == "\\":
                if choices is not None or len(out) >= limit:  # keys are plain; an escape needs room
                    raise _Bad
                esc = self.s[self.i + 1 : self.i + 2]
                if not esc:
                    self.i += 1
                    raise _End(2)
                if esc in '"\\/bfnrt':
                    out.append(json.loads(f'"\\{esc}"'))
                    self.i += 2
                elif esc == "u":
                    hexa = self.s[self.i + 2 : self.i + 6]
                    if any(h not in "0123456789abcdefABCDEF" for h in hexa):
                        raise _Bad
                    if len(hexa) < 4:
                        self.i = len(self.s)
                        raise _End(4 - len(hexa) + 1)
                    out.append(chr(int(hexa, 16)))
                    self.i += 6
                else:
                    raise _Bad
            elif ord(c) < 0x20:
                raise _Bad
            else:
                out.append(c)
                self.i += 1
            if len(out) > limit:
                raise _Bad
            if choices is not None and not any(ch.startswith("".join(out)) for ch in choices):
                raise _Bad

    def number(self, integer: bool) -> None:
        start = self.i
        s = self.s
        n = len(s)
        i = self.i
        if i < n and s[i] == "-":
            i += 1
        if i >= n:
            self.i = i
            raise _End(1)
        if s[i] == "0":
            i += 1
        elif s[i].isdigit():
            while i < n and s[i].isdigit():
                i += 1
        else:
            raise _Bad
        # A fraction or an exponent is started only with room left to finish it within MAX_NUMBER.
        if i < n and s[i] == "." and not integer:
            if i - start + 2 > MAX_NUMBER:
                raise _Bad
            i += 1
            if i >= n:
                self.i = i
                raise _End(1)
            if not s[i].isdigit():
                raise _Bad
            while i < n and s[i].isdigit():
                i += 1
        if i < n and s[i] in "eE" and not integer:
            if i - start + 3 > MAX_NUMBER:
                raise _Bad
            i += 1
            if i < n and s[i] in "+-":
                i += 1
            if i >= n:
                self.i = i
                raise _End(1)
            if not s[i].isdigit():
                raise _Bad
            while i < n and s[i].isdigit():
                i += 1
        if i - start > MAX_NUMBER:
            raise _Bad
        self.i = i
        if i >= n:
            raise _End(0)  # a complete number, though more digits may follow

    def array(self, schema: dict, depth: int) -> None:
        self.i += 1
        items = schema.get("items", {})
        lo, hi = schema.get("minItems", 0), min(schema.get("maxItems", MAX_ITEMS), MAX_ITEMS)
        k = 0
        item_len = min_len(items) if lo else 0

        def left(count: int) -> int:
            return max(lo - count, 0) * (item_len + 1) + 1

        self.space(left(0))
        if self.s[self.i] == "]":
            if lo > 0:
                raise _Bad
            self.i += 1
            return
        while True:
            try:
                self.value(items, depth + 1)
            except _End as e:
                raise _End(e.need + left(k + 1)) from None
            k += 1
            if k > hi:
                raise _Bad
            self.space(left(k))
            c = self.s[self.i]
            self.i += 1
            if c == "]":
                if k < lo:
                    raise _Bad
                return
            if c != "," or k >= hi:
                raise _Bad

    @staticmethod
    def _key_need(partial: str, choices, props: dict, left: int, required: list, seen: list) -> int:
        """The shortest completion from inside a key: the key's rest, its quote, colon and
        shortest value, then the members still required (this key's own no longer counted)."""
        if choices is None:
            return 3 + left  # ":0 and the rest
        best = None
        for c in choices:
            if c.startswith(partial):
                own = _member(c, props[c]) if c in required and c not in seen else 0
                need = len(c) - len(partial) + 2 + min_len(props[c]) + left - own
                best = need if best is None else min(best, need)
        return best if best is not None else left

    def object(self, schema: dict, depth: int) -> None:
        self.i += 1
        props = schema.get("properties")
        free = props is None
        props = props or {}
        required = [r for r in (schema.get("required") or []) if r in props or free]
        seen: list[str] = []

        def left() -> int:
            return sum(len(json.dumps(r)) + 2 + min_len(props.get(r, {})) for r in required if r not in seen) + 1

        def another() -> int:  # after a comma: the shortest next member, then the rest
            if any(r not in seen for r in required):
                return left() - 1
            if free:
                return 5  # "":0}
            rest = [k for k in props if k not in seen]
            return min(len(json.dumps(k)) + 1 + min_len(props[k]) for k in rest) + 1 if rest else 1

        self.space(left())
        if self.s[self.i] == "}":
            if any(r not in seen for r in required):
                raise _Bad
            self.i += 1
            return
        while True:
            if self.s[self.i] != '"':
                raise _Bad
            choices = None if free else [k for k in props if k not in seen]
            if choices is not None and not choices:
                raise _Bad
            start = self.i
            try:
                key = self.string(MAX_KEY, choices)
            except _End:
                raise _End(self._key_need(self.s[start + 1 :], choices, props, left(), required, seen)) from None
            if key in seen or len(seen) >= MAX_KEYS:
                raise _Bad
            sub = props.get(key, {})
            seen.append(key)
            self.space(1 + min_len(sub) + left())
            if self.s[self.i] != ":":
                raise _Bad
            self.i += 1
            try:
                self.value(sub, depth + 1)
            except _End as e:
                raise _End(e.need + left()) from None
            self.space(left())
            c = self.s[self.i]
            self.i += 1
            if c == "}":
                if any(r not in seen for r in required):
                    raise _Bad
                return
            if c != "," or (not free and all(k in seen for k in props)) or len(seen) >= MAX_KEYS:
                raise _Bad  # a comma needs a key still to come
            self.space(another())


def _member(key: str, schema: dict) -> int:
    return len(json.dumps(key)) + 2 + min_len(schema)


class JsonConstraint:
    """The replies a JSON schema accepts (``{"type": "object"}``: any JSON object)."""

    def __init__(self, schema: dict):
        self.schema = schema

    def check(self, text: str) -> tuple[str, int]:
        """("complete", 0), ("partial", characters the shortest completion needs) or ("invalid", -1)."""
        p = _Parser(text)
        try:
            p.value(self.schema, 0)
        except _End as e:
            return "partial", e.need
        except _Bad:
            return "invalid", -1
        rest = text[p.i :]
        if rest.strip() or len(rest) > 2:
            return "invalid", -1
        return "complete", 0

    def allowed(self, text: str) -> bool:
        return self.check(text)[0] != "invalid"

    def complete(self, text: str) -> bool:
        """Whether ``text`` is a whole value (a number at the very end may still grow, yet is whole)."""
        return self.check(text) in (("complete", 0), ("partial", 0))
