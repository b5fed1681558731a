"""YAML that remembers where each value came from, so errors can name a line."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

Path = tuple[Any, ...]


@dataclass
class Located:
    """Plain Python data from a YAML document, with the line of every key and item."""

    data: Any
    lines: dict[Path, int] = field(default_factory=dict)
    duplicates: list[tuple[Path, int]] = field(default_factory=list)

    def line(self, path: Path) -> int | None:
        """The line of `path`, or of its nearest ancestor that has one."""
        while True:
            if path in self.lines:
                return self.lines[path]
            if not path:
                return None
            path = path[:-1]


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:float"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


class YamlSyntaxError(ValueError):
    def __init__(self, line: int | None, message: str) -> None:
        super().__init__(message)
        self.line = line


def load(text: str) -> Located:
    """Parses one YAML document; raises `YamlSyntaxError` with the line of the problem."""
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark else None
        raise YamlSyntaxError(line, f"{err.problem or err.context}") from None
    except yaml.reader.ReaderError as err:  # a character YAML does not allow, such as NUL
        shown = f"U+{err.character:04X}" if isinstance(err.character, int) else repr(err.character)
        raise YamlSyntaxError(text.count("\n", 0, err.position) + 1, f"character {shown} is not allowed in YAML") from None
    located = Located(data=None)
    if node is not None:
        located.data = _build(node, (), located, _Loader(""))
    return located


# Aliases let a few lines stand for billions of values ("billion laughs"); a study file is far
# below this, and building past it would take the machine's memory.
MAX_VALUES = 100_000


def _build(node: yaml.Node, path: Path, out: Located, loader: _Loader) -> Any:
    if len(out.lines) >= MAX_VALUES:  # one path per value built, an alias's copies each their own
        raise YamlSyntaxError(node.start_mark.line + 1, f"the file expands to more than {MAX_VALUES} values "
                                                         "(aliases of aliases?)")
    out.lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # resolves `<<:` merge keys
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if isinstance(key, list):
                key = tuple(key)
            child = (*path, key)
            if key in result:
                out.duplicates.append((child, key_node.start_mark.line + 1))
            out.lines[child] = key_node.start_mark.line + 1
            result[key] = _build(value_node, child, out, loader)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, (*path, i), out, loader) for i, item in enumerate(node.value)]
    return loader.construct_object(node, deep=True)
