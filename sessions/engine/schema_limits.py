"""How large a JSON schema may be before anything compiles it.

A schema is measured first: its size in bytes, how many ``$ref`` it has, how deep it nests and
how large it would grow with every ``$ref`` written out in place. The last is what a compile
bomb abuses: ``allOf`` makes the constraint library inline and intersect what it refers to, so
definitions that each combine two references to the one before double the work with every
level (twenty levels took seconds and hundreds of megabytes, never given back), and ``allOf``
over ``anyOf`` multiplies their branches. Plain data only: the request parsers use it too.
"""

import json
from typing import Any, Dict, List, NamedTuple, Optional
from urllib.parse import unquote, urljoin

from sessions.errors import InvalidRequest

MAX_SCHEMA_BYTES = 64 * 1024  # a JSON schema as JSON text
MAX_REFS = 512
MAX_DEPTH = 128  # objects and arrays nested, references followed (the library's own parser stops at 128)
# Schema nodes once every $ref is written out in place and every allOf distributed over its
# anyOf branches: about 2,000 properties' worth, which the library compiles in well under a second.
MAX_EXPANSION = 10_000
REGEX_WEIGHT = 8  # a format or a pattern is compiled to a regular expression: several nodes' work

# Keywords whose value is a subschema (or a list of them), and those whose value maps names to
# subschemas; a reference target written where neither is expected counts as a schema too.
_SUBSCHEMA_KEYS = frozenset({"additionalProperties", "items", "prefixItems", "additionalItems", "contains", "not",
                             "if", "then", "else", "propertyNames", "unevaluatedItems", "unevaluatedProperties",
                             "contentSchema"})
_SUBSCHEMA_MAP_KEYS = frozenset({"properties", "patternProperties", "dependentSchemas", "dependencies"})
# Keywords that add no constraint of their own beside the combinators.
_NOT_CONSTRAINTS = frozenset({"$ref", "allOf", "anyOf", "oneOf", "$defs", "definitions", "$id", "$anchor",
                              "$schema", "$comment", "title", "description", "default", "examples",
                              "deprecated", "readOnly", "writeOnly", "x-guidance"})


def check_schema(schema: Any, param: str, text: Optional[str] = None) -> None:
    """Raises ``InvalidRequest`` naming ``param`` when the JSON schema ``schema`` (given as
    ``text`` too, when its JSON text is at hand) is over this server's limits."""
    size = len((text if text is not None else json.dumps(schema)).encode())
    if size > MAX_SCHEMA_BYTES:
        raise InvalidRequest(f"{param}: the JSON schema is {size} bytes; at most {MAX_SCHEMA_BYTES} are accepted",
                             param=param)
    _SchemaWalk(schema, param).check()


class _Estimate(NamedTuple):
    """One subschema's share of the expansion: nodes, alternative branches, nesting below it."""

    cost: int
    branches: int
    height: int


class _SchemaWalk:
    """Follows a schema's references as the constraint library would, to estimate its expansion.

    Every ``$ref`` counts as its target written out in place (each target estimated once); an
    ``allOf`` (or a ``$ref`` or ``anyOf`` beside other keywords) is an intersection, which the
    library distributes over the branches of its parts; a reference back into a definition being
    expanded is a cycle, which the library compiles as a rule, and counts once.
    """

    def __init__(self, root: Any, param: str):
        self.root = root
        self.param = param
        self._bases: Dict[int, str] = {}  # id of each object -> the URI its references resolve against
        self._resources: Dict[str, Any] = {}  # a $id -> its subschema
        self._anchors: Dict[str, Any] = {}  # a $anchor, with its resource's URI -> its subschema
        self._estimates: Dict[int, _Estimate] = {}
        self._expanding: set = set()

    def refuse(self, problem: str) -> InvalidRequest:
        return InvalidRequest(f"{self.param}: the JSON schema {problem}", param=self.param)

    def check(self) -> None:
        refs = self._index()
        if refs > MAX_REFS:
            raise self.refuse(f"has {refs} $ref; at most {MAX_REFS} are accepted")
        self._estimate(self.root, 0)

    def _index(self) -> int:
        """Notes every object's base URI, $id and $anchor; returns how many $ref there are."""
        refs, stack = 0, [(self.root, "")]
        while stack:
            node, base = stack.pop()
            if isinstance(node, list):
                stack.extend((item, base) for item in node)
            elif isinstance(node, dict):
                if isinstance(node.get("$id"), str):
                    base = _join(base, node["$id"]).partition("#")[0]
                    self._resources[base] = node
                if isinstance(node.get("$anchor"), str):
                    self._anchors[f"{base}#{node['$anchor']}"] = node
                self._bases[id(node)] = base
                refs += isinstance(node.get("$ref"), str)
                stack.extend((value, base) for value in node.values())
        return refs

    def _resolve(self, node: dict) -> Any:
        uri = _join(self._bases[id(node)], node["$ref"])
        document, _, fragment = uri.partition("#")
        resource = self._resources.get(document, self.root if document == self._bases[id(self.root)] else None)
        fragment = unquote(fragment)
        if resource is not None and fragment.startswith("/"):
            return self._pointer(resource, fragment, node["$ref"])
        target = resource if resource is not None and not fragment else self._anchors.get(uri)
        if target is None:
            raise self.refuse(f"has a $ref that does not point into it: {node['$ref'][:100]!r}")
        return target

    def _pointer(self, resource: Any, pointer: str, ref: str) -> Any:
        target = resource
        for token in pointer[1:].split("/"):
            token = token.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and token in target:
                target = target[token]
            elif isinstance(target, list) and token.isdigit() and int(token) < len(target):
                target = target[int(token)]
            else:
                raise self.refuse(f"has a $ref that does not point into it: {ref[:100]!r}")
        return target

    def _estimate(self, node: Any, depth: int) -> _Estimate:
        if not isinstance(node, dict):  # true, false, or what the library refuses anyway
            return _Estimate(0, 1, 0)
        known = self._estimates.get(id(node))
        if known is None:
            if id(node) in self._expanding:  # a cycle
                return _Estimate(1, 1, 0)
            if depth > MAX_DEPTH:
                raise self.refuse(f"nests deeper than {MAX_DEPTH} levels (references followed)")
            self._expanding.add(id(node))
            try:
                known = self._estimate_object(node, depth)
            finally:
                self._expanding.discard(id(node))
            if known.cost > MAX_EXPANSION:
                raise self.refuse(f"would grow to more than {MAX_EXPANSION} nodes with its references written "
                                  "out (each allOf of them copies what they refer to)")
            self._estimates[id(node)] = known
        if depth + known.height > MAX_DEPTH:
            raise self.refuse(f"nests deeper than {MAX_DEPTH} levels (references followed)")
        return known

    def _estimate_object(self, node: dict, depth: int) -> _Estimate:
        own_cost, own_height, parts = 0, 0, []
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                parts.append(_nested(self._estimate(self._resolve(node), depth + 1), 1))
            elif key == "allOf" and isinstance(value, list):
                parts.extend(_nested(self._estimate(branch, depth + 2), 2) for branch in value)
            elif key in ("anyOf", "oneOf") and isinstance(value, list):
                branches = [self._estimate(branch, depth + 2) for branch in value]
                parts.append(_Estimate(_capped(sum(branch.cost for branch in branches)),
                                       _capped(sum(branch.branches for branch in branches)),
                                       2 + max((branch.height for branch in branches), default=0)))
            elif key in ("format", "pattern") and isinstance(value, str):
                own_cost += REGEX_WEIGHT
            elif key == "enum" and isinstance(value, list):
                own_cost += len(value)
            elif key in _SUBSCHEMA_KEYS or key in _SUBSCHEMA_MAP_KEYS:
                for child in _subschemas(key, value):
                    estimate = self._estimate(child, depth + 2)
                    own_cost, own_height = _capped(own_cost + estimate.cost), max(own_height, 2 + estimate.height)
        if any(key not in _NOT_CONSTRAINTS for key in node):
            types = node.get("type")
            parts.append(_Estimate(own_cost, len(types) if isinstance(types, list) and types else 1, own_height))
        return _intersection(parts)


def _subschemas(key: str, value: Any) -> list:
    """The subschemas the value of keyword ``key`` holds."""
    if key in _SUBSCHEMA_MAP_KEYS:
        return list(value.values()) if isinstance(value, dict) else []
    return value if isinstance(value, list) else [value]


def _nested(estimate: _Estimate, levels: int) -> _Estimate:
    return estimate._replace(height=estimate.height + levels)


def _intersection(parts: List[_Estimate]) -> _Estimate:
    """A schema node made of ``parts`` (its own keywords, its $ref's target, its allOf and anyOf):
    the library intersects them, one branch of each part at a time, so each part's nodes are
    copied once per combination of the other parts' branches."""
    before = [1]  # the product of the branches of the parts before each one, then after it
    for part in parts:
        before.append(_capped(before[-1] * part.branches))
    cost, after = 1, 1
    for index in range(len(parts) - 1, -1, -1):
        cost = _capped(cost + parts[index].cost * _capped(before[index] * after))
        after = _capped(after * parts[index].branches)
    return _Estimate(cost, before[-1], max((part.height for part in parts), default=0))


def _capped(count: int) -> int:
    # Past the limit the exact count does not matter; capping keeps the numbers small.
    return min(count, MAX_EXPANSION + 1)


def _join(base: str, reference: str) -> str:
    """``reference`` resolved against ``base`` (a bare fragment stays within ``base``, whatever its scheme)."""
    if reference.startswith("#"):
        return base.partition("#")[0] + reference
    return urljoin(base, reference)
