"""Pipeline YAML → :class:`Executable`, the compiled form that travels in packages.

A pipeline looks like Vela's::

    version: "1"
    steps:
      - name: test
        image: local            # optional; the bwrap/local runtimes run host tools
        commands: [make test]
        environment: {GOFLAGS: -mod=vendor, GO_VERSION: 1.10}   # text as written
        secrets:
          - api_key             # the repo's secret, else the org's: $API_KEY
          - key: acme/ops/deploy_key   # team ops's (shared) secret of org acme,
            type: shared               # given only to repos on its allowlist
            target: DEPLOY_TOKEN       # optional; default its name upper-cased
        timeout: 5m             # seconds, or a duration like 90s / 5m / 1h30m
        failure: ignore         # the build goes on if this step fails

The same pydantic models validate the YAML and the stored JSON, so an
executable read back from the database or a package is checked exactly as
one compiled from YAML. Every problem surfaces as :class:`PipelineError` whose
message names the line and the field, never as a traceback.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from vela.domain import OWNER_NAME
from vela.errors import VelaError

MAX_PIPELINE_CHARS = 256 * 1024
# Linux takes no single argument or environment string longer than this (MAX_ARG_STRLEN,
# with its NUL): a step's script is one argument, each variable one string.
MAX_EXEC_STRING_BYTES = 128 * 1024 - 1
# Variables a step's environment and secrets may set: bubblewrap takes 9,000 arguments
# in all, and each variable is three (--setenv NAME VALUE).
MAX_STEP_VARIABLES = 1000
MAX_STEPS = 100
MAX_ERRORS_SHOWN = 20
DEFAULT_IMAGE = "local"

_STEP_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9 _.-]{0,61}[A-Za-z0-9_.-])?")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# What a step's ``secrets`` may name, and so what the API lets a secret be called.
SECRET_NAME = r"[A-Za-z_][A-Za-z0-9_]{0,127}"  # noqa: S105 - a pattern
_SECRET_NAME = re.compile(SECRET_NAME)
# A shared secret's key: org/team/name.
_SHARED_KEY = re.compile(rf"{OWNER_NAME}/{OWNER_NAME}/{SECRET_NAME}")
_IMAGE = re.compile(r"\S{1,255}")
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")
_MERGE_TAG = "tag:yaml.org,2002:merge"


class PipelineError(VelaError):
    """The pipeline (YAML or stored executable) is invalid.

    ``problems`` holds ``(line or None, field path, message)`` for each problem;
    ``str()`` shows them one per line, e.g.
    ``line 4: steps[0].commands: field required``.
    """

    def __init__(self, problems: list[tuple[int | None, str, str]]) -> None:
        self.problems = problems
        shown = [_format_problem(*p) for p in problems[:MAX_ERRORS_SHOWN]]
        if len(problems) > MAX_ERRORS_SHOWN:
            shown.append(f"... and {len(problems) - MAX_ERRORS_SHOWN} more problems")
        super().__init__("\n".join(shown))

    def __reduce__(self) -> tuple[type[PipelineError], tuple[list[tuple[int | None, str, str]]]]:
        return type(self), (self.problems,)  # it crosses actor calls (answer_each)


def _format_problem(line: int | None, path: str, message: str) -> str:
    prefix = f"line {line}: " if line is not None else ""
    return f"{prefix}{path}: {message}" if path else f"{prefix}{message}"


def secret_env_name(secret: str) -> str:
    """Vela's convention: secret ``api_key`` reaches a step as ``API_KEY``."""
    return secret.upper()


def shared_secret_key(ref: str) -> tuple[str, str, str] | None:
    """``(org, team, name)`` if ``ref`` — what a step's secret is known by in
    :meth:`Executable.secret_names` and in a package — is a shared secret's key; None
    for a repo or org secret's name (which holds no ``/``)."""
    parts = ref.split("/")
    return (parts[0], parts[1], parts[2]) if len(parts) == 3 else None


# --- field checks -----------------------------------------------------------


def _check_step_name(v: str) -> str:
    if not _STEP_NAME.fullmatch(v):
        raise ValueError(
            "must be 1-63 characters of letters, digits, spaces, '.', '_' or '-', "
            "starting with a letter or digit and not ending with a space"
        )
    return v


def _check_image(v: str) -> str:
    if not _IMAGE.fullmatch(v):
        raise ValueError("must be 1-255 characters without whitespace")
    return v


def _variable_problem(name: str) -> tuple[str, str] | None:
    """Why a step may not set variable ``name`` (error type and message), or None."""
    if not _ENV_NAME.fullmatch(name):
        return "env_name", "not a valid variable name"
    if name.upper().startswith("VELA_"):
        return "env_reserved", "variables named VELA_* are set by Vela"
    return None


def _check_variable(v: str) -> str:
    problem = _variable_problem(v)
    if problem is not None:
        raise PydanticCustomError(*problem)
    return v


def _check_shared_key(v: str) -> str:
    if not _SHARED_KEY.fullmatch(v):
        raise ValueError("must be org/team/name, e.g. acme/ops/deploy_key: org and team of "
                         "letters, digits, '.', '_' or '-', the name of letters, digits and '_'")
    return v


def _check_command(v: str) -> str:
    if "\x00" in v:
        raise ValueError("must not contain NUL characters")
    return v


def _to_seconds(v: Any) -> Any:
    """``30``, ``2.5``, ``"45"``, ``"90s"``, ``"5m"``, ``"1h30m"`` → seconds."""
    if v is None:
        return None
    if isinstance(v, bool):
        raise ValueError("must be a number of seconds or a duration like '5m'")
    if isinstance(v, int | float):
        try:
            seconds = float(v)
        except OverflowError:  # an int beyond any float is out of range all the same
            seconds = math.inf
    elif isinstance(v, str):
        text = v.strip()
        try:
            seconds = float(text)
        except ValueError:
            m = _DURATION.fullmatch(text)
            if not text or m is None:
                raise ValueError(
                    f"{v!r} is not a duration; use seconds or e.g. '90s', '5m', '1h30m'"
                ) from None
            h, mi, s = (float(g) if g else 0.0 for g in m.groups())
            seconds = h * 3600 + mi * 60 + s
    else:
        raise ValueError("must be a number of seconds or a duration like '5m'")
    if not (0 < seconds <= 7 * 24 * 3600):
        raise ValueError("must be more than 0 seconds and at most 7 days")
    return seconds


def _scalars_to_str(v: Any) -> Any:
    """YAML gives ``PORT: 8080`` as an int; environment values are strings."""
    if not isinstance(v, dict):
        return v
    out: dict[Any, Any] = {}
    for k, val in v.items():
        if isinstance(val, bool):
            val = "true" if val else "false"
        elif isinstance(val, int | float):
            val = str(val)
        out[k] = val
    return out


def _version_to_str(v: Any) -> Any:
    return "1" if v == 1 and not isinstance(v, bool) else v


StepName = Annotated[str, AfterValidator(_check_step_name)]
Image = Annotated[str, AfterValidator(_check_image)]
Command = Annotated[str, AfterValidator(_check_command)]
Seconds = Annotated[float | None, BeforeValidator(_to_seconds)]


class SharedSecret(BaseModel):
    """A team's secret named in a step, Vela's way: ``key: org/team/name`` and ``type:
    shared`` (the team is not implied by the repo). It sets ``target``, by default its
    name in upper case."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: Annotated[str, AfterValidator(_check_shared_key)]
    type: Literal["shared"]
    target: Annotated[str, AfterValidator(_check_variable)] | None = None

    @property
    def variable(self) -> str:
        return self.target or secret_env_name(self.key.rpartition("/")[2])

    @model_validator(mode="after")
    def _default_variable_allowed(self) -> SharedSecret:
        problem = None if self.target else _variable_problem(self.variable)
        if problem is not None:  # a name vela_*: VELA_* is Vela's, as for a target
            kind, message = problem
            raise PydanticCustomError(
                kind, "its variable by default, {var}: " + message + "; give a target",
                {"var": self.variable, "sub_loc": ("key",)})
        return self


# Pydantic puts a tagged union's tag in an error's location; _problems leaves it out.
_SHARED_TAG = "<shared secret>"
_NAME_TAG = "<secret name>"


def _secret_kind(v: Any) -> str | None:
    if isinstance(v, str):
        return _NAME_TAG
    return _SHARED_TAG if isinstance(v, dict | SharedSecret) else None


# A step's ``secrets`` entry: a repo/org secret's name, or a shared secret.
SecretEntry = Annotated[
    Annotated[str, Tag(_NAME_TAG)] | Annotated[SharedSecret, Tag(_SHARED_TAG)],
    Discriminator(_secret_kind, custom_error_type="secret_entry",
                  custom_error_message="a secret is a name, or a mapping with key, type: "
                                       "shared and target"),
]


def _secret_ref(entry: str | SharedSecret) -> tuple[str, str]:
    """The variable an entry sets, and what the secret is known by."""
    if isinstance(entry, SharedSecret):
        return entry.variable, entry.key
    return secret_env_name(entry), entry


class Step(BaseModel):
    """One step. ``timeout`` is normalised to seconds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: StepName
    image: Image = DEFAULT_IMAGE
    commands: list[Command] = Field(min_length=1, max_length=1000)
    environment: Annotated[dict[str, str], BeforeValidator(_scalars_to_str)] = Field(
        default_factory=dict, max_length=MAX_STEP_VARIABLES
    )
    secrets: list[SecretEntry] = Field(default_factory=list, max_length=MAX_STEP_VARIABLES)
    timeout: Seconds = None
    failure: Literal["fail", "ignore"] = "fail"

    @property
    def ignore_failure(self) -> bool:
        return self.failure == "ignore"

    def script(self) -> str:
        """The text run as ``sh -e -c <script>``."""
        return "\n".join(self.commands)

    def secret_variables(self) -> dict[str, str]:
        """Each variable the step's secrets set → the secret: a repo or org secret's
        name, or a shared secret's key."""
        return dict(_secret_ref(entry) for entry in self.secrets)

    @field_validator("environment")
    @classmethod
    def _env_names(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            problem = _variable_problem(key)
            if problem is not None:
                raise PydanticCustomError(*problem, {"sub_loc": (key,)})
            if "\x00" in value:
                raise PydanticCustomError(
                    "env_nul", "must not contain NUL characters", {"sub_loc": (key,)}
                )
        return v

    @field_validator("secrets")
    @classmethod
    def _secret_entries(cls, v: list[str | SharedSecret]) -> list[str | SharedSecret]:
        seen: dict[str, str] = {}
        for i, entry in enumerate(v):
            if isinstance(entry, str) and not _SECRET_NAME.fullmatch(entry):
                raise PydanticCustomError(
                    "secret_name",
                    "secret names are letters, digits and '_', not starting with a digit",
                    {"sub_loc": (i,)},
                )
            var, ref = _secret_ref(entry)
            if var in seen:
                raise PydanticCustomError(
                    "secret_duplicate", "secrets '{other}' and '{name}' both set {var}",
                    {"name": ref, "var": var, "other": seen[var], "sub_loc": (i,)},
                )
            seen[var] = ref
        return v

    @model_validator(mode="after")
    def _fits_one_exec(self) -> Step:
        if len(self.environment) + len(self.secrets) > MAX_STEP_VARIABLES:
            raise PydanticCustomError(
                "too_many_variables",
                "environment and secrets set more than {limit} variables together",
                {"limit": MAX_STEP_VARIABLES, "sub_loc": ("environment",)})
        size = len(self.script().encode())
        if size > MAX_EXEC_STRING_BYTES:
            raise PydanticCustomError(
                "script_too_long",
                "the commands come to {size} bytes, more than the {limit} a step can run "
                "(the system's limit on one argument): split them over steps, or put them "
                "in a script in the repository",
                {"size": size, "limit": MAX_EXEC_STRING_BYTES, "sub_loc": ("commands",)})
        for key, value in self.environment.items():
            if len(f"{key}={value}".encode()) > MAX_EXEC_STRING_BYTES:
                raise PydanticCustomError(
                    "env_too_long", "longer than the {limit} bytes the system takes",
                    {"limit": MAX_EXEC_STRING_BYTES, "sub_loc": ("environment", key)})
        return self

    @model_validator(mode="after")
    def _no_env_secret_clash(self) -> Step:
        for var, name in self.secret_variables().items():
            if var in self.environment:
                raise PydanticCustomError(
                    "secret_env_clash",
                    "environment sets {var} which secret '{name}' also sets",
                    {"var": var, "name": name, "sub_loc": ("environment", var)},
                )
        return self


def _check_unique_names(steps: list[Step]) -> list[Step]:
    seen: set[str] = set()
    for i, step in enumerate(steps):
        if step.name in seen:
            raise PydanticCustomError(
                "duplicate_step_name", "duplicate step name '{name}'",
                {"name": step.name, "sub_loc": (i, "name")},
            )
        seen.add(step.name)
    return steps


class Executable(BaseModel):
    """The compiled pipeline: what the server stores and the worker runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Annotated[Literal["1"], BeforeValidator(_version_to_str)]
    steps: Annotated[
        list[Step], Field(min_length=1, max_length=MAX_STEPS), AfterValidator(_check_unique_names)
    ]

    def secret_names(self) -> list[str]:
        """Every secret some step lists, sorted: what the server must gather. A repo or
        org secret by its name, a shared secret by its key (:func:`shared_secret_key`)."""
        return sorted({ref for step in self.steps for ref in step.secret_variables().values()})

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, data: str | bytes) -> Executable:
        try:
            return cls.model_validate_json(data)
        except ValidationError as e:
            raise PipelineError(_problems(e, {})) from None


# --- YAML with line numbers -------------------------------------------------


def compile_pipeline(text: str) -> Executable:
    """Parse and validate pipeline YAML; raise :class:`PipelineError` with lines."""
    if len(text) > MAX_PIPELINE_CHARS:
        raise PipelineError(
            [(None, "", f"pipeline is larger than {MAX_PIPELINE_CHARS} characters")]
        )
    try:
        data, lines = _load(text)
    except PipelineError:
        raise
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = ", ".join(p for p in (e.context, e.problem) if p) or "cannot parse"
        raise PipelineError([(line, "", f"invalid YAML: {problem}")]) from None
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, max(e.position, 0)) + 1
        raise PipelineError([(line, "", f"invalid YAML: {e.reason}")]) from None
    except yaml.YAMLError as e:
        raise PipelineError([(None, "", f"invalid YAML: {e}")]) from None
    except RecursionError:
        raise PipelineError([(None, "", "pipeline nests too deeply")]) from None
    except (ValueError, TypeError, OverflowError) as e:
        # PyYAML's constructors can raise these for odd scalars (e.g. a date
        # that matches the timestamp pattern but does not exist).
        raise PipelineError([(None, "", f"invalid YAML value: {e}")]) from None

    if data is None:
        raise PipelineError([(1, "", "pipeline is empty; expected `version` and `steps`")])
    if not isinstance(data, dict):
        raise PipelineError(
            [(lines.get((), 1), "", "pipeline must be a mapping with `version` and `steps`")]
        )
    try:
        # YAML aliases repeat what they name without its text: a few KB could stand for
        # GB, made real by validating it. Without aliases this is at most the text's size.
        size = _expanded_chars(data, {})
        if size > MAX_PIPELINE_CHARS:
            raise PipelineError([(None, "", f"pipeline expands to {size} characters, more "
                                            f"than {MAX_PIPELINE_CHARS} (YAML aliases count "
                                            "each time they are used)")])
        return Executable.model_validate(data)
    except ValidationError as e:
        raise PipelineError(_problems(e, lines)) from None
    except RecursionError:
        raise PipelineError([(None, "", "pipeline nests too deeply")]) from None


def _expanded_chars(data: Any, seen: dict[int, int]) -> int:
    """The characters of every string in ``data`` counted each time it is reached (as
    validating or storing it would), each shared object measured once."""
    known = seen.get(id(data))
    if known is not None:
        return known
    if isinstance(data, str):
        size = len(data)
    elif isinstance(data, dict):
        size = sum(_expanded_chars(k, seen) + _expanded_chars(v, seen) for k, v in data.items())
    elif isinstance(data, list):
        size = sum(_expanded_chars(x, seen) for x in data)
    else:
        size = 0
    seen[id(data)] = size
    return size


# libyaml's parser where PyYAML has it (5x faster than the pure-Python one here).
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _load(text: str) -> tuple[Any, dict[tuple[str, ...], int]]:
    loader = _LOADER(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        # Walk before constructing: construction flattens merge keys in place.
        lines = _line_map(node)
        _variables_as_text(node)
        return loader.construct_document(node), lines
    finally:
        loader.dispose()


_STR_TAG = "tag:yaml.org,2002:str"
_NULL_TAG = "tag:yaml.org,2002:null"


def _variables_as_text(root: yaml.Node) -> None:
    """Environment names and values, secret names and a shared secret's ``target`` are
    text as written: YAML would make ``1.10`` the float 1.1, ``0755`` the int 493,
    ``12:30`` 750 and the name ``ON`` true. Their plain scalars are replaced by string
    copies before the document is constructed (copies: an alias of the same scalar
    elsewhere, a ``timeout`` say, keeps its type). Each node is visited once, so nested
    aliases cannot make the walk explode."""
    seen: set[int] = set()
    done: set[int] = set()  # apart: a mapping seen as a step's may be an environment too
    for step in _sequence_items(_entries(root, "steps", seen)):
        for mapping in _merged(step, seen):
            for key_node, value_node in mapping.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue
                if key_node.value == "environment":
                    for env in _merged(value_node, done):
                        env.value = [(_as_text(k), _as_text(v)) for k, v in env.value]
                elif key_node.value == "secrets":
                    if isinstance(value_node, yaml.SequenceNode) and id(value_node) not in done:
                        done.add(id(value_node))
                        value_node.value = [_as_text(item) for item in value_node.value]
                    for entry in _sequence_items([value_node]):
                        for shared in _merged(entry, done):
                            shared.value = [(k, _as_text(v) if k.value == "target" else v)
                                            for k, v in shared.value]


def _as_text(node: yaml.Node) -> yaml.Node:
    if (isinstance(node, yaml.ScalarNode) and not node.style  # plain
            and node.tag not in (_NULL_TAG, _MERGE_TAG)):
        return yaml.ScalarNode(_STR_TAG, node.value, node.start_mark, node.end_mark)
    return node


def _merged(node: yaml.Node, seen: set[int]) -> list[yaml.MappingNode]:
    """A mapping node and the mappings it merges (``<<``: one, or a list of them), each
    once."""
    if not isinstance(node, yaml.MappingNode) or id(node) in seen:
        return []
    seen.add(id(node))
    out = [node]
    for key_node, value_node in node.value:
        if key_node.tag == _MERGE_TAG:
            merged = (value_node.value if isinstance(value_node, yaml.SequenceNode)
                      else [value_node])
            for m in merged:
                out += _merged(m, seen)
    return out


def _entries(node: yaml.Node, key: str, seen: set[int]) -> list[yaml.Node]:
    """The values of ``key`` in a mapping node, merged mappings included."""
    return [value_node for mapping in _merged(node, seen) for key_node, value_node
            in mapping.value if isinstance(key_node, yaml.ScalarNode) and key_node.value == key]


def _sequence_items(nodes: list[yaml.Node]) -> list[yaml.Node]:
    return [item for node in nodes if isinstance(node, yaml.SequenceNode) for item in node.value]


def _line_map(root: yaml.Node) -> dict[tuple[str, ...], int]:
    """Path (as strings) → 1-based line; also rejects duplicate mapping keys.

    Each node is visited once, so aliases cannot make the walk explode.
    """
    lines: dict[tuple[str, ...], int] = {}
    seen: set[int] = set()
    stack: list[tuple[tuple[str, ...], yaml.Node]] = [((), root)]
    while stack:
        path, node = stack.pop()
        lines.setdefault(path, node.start_mark.line + 1)
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys: set[str] = set()
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = str(key_node.value)
                if key in keys:
                    raise PipelineError(
                        [(key_node.start_mark.line + 1, _format_loc((*path, key)),
                          "duplicate key")]
                    )
                keys.add(key)
                lines.setdefault((*path, key), key_node.start_mark.line + 1)
                stack.append(((*path, key), value_node))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                stack.append(((*path, str(i)), item))
    return lines


_MESSAGES = {
    "missing": "field required",
    "extra_forbidden": "unknown key",
}


def _problems(
    error: ValidationError, lines: dict[tuple[str, ...], int]
) -> list[tuple[int | None, str, str]]:
    out: list[tuple[int | None, str, str]] = []
    for err in error.errors(include_url=False, include_input=False):
        raw = err["loc"]  # less the tag of a secrets entry's kind, after the entry's index
        loc = tuple(p for i, p in enumerate(raw)
                    if not (p in (_SHARED_TAG, _NAME_TAG) and i and isinstance(raw[i - 1], int)))
        ctx = err.get("ctx") or {}
        loc += tuple(ctx.get("sub_loc", ()))
        msg = _MESSAGES.get(err["type"], err["msg"])
        msg = msg.removeprefix("Value error, ")
        msg = msg[:1].lower() + msg[1:]
        if loc and loc[-1] == "[key]":  # pydantic's marker for a bad mapping key
            loc, msg = loc[:-1], f"key: {msg}"
        if err["type"] == "model_type" and not loc:
            msg = "pipeline must be a mapping with `version` and `steps`"
        out.append((_line_for(loc, lines), _format_loc(loc), msg))
    out.sort(key=lambda p: (p[0] or 0, p[1]))
    return out


def _line_for(loc: tuple[Any, ...], lines: dict[tuple[str, ...], int]) -> int | None:
    if not lines:
        return None
    path = tuple(str(p) for p in loc)
    for n in range(len(path), -1, -1):
        if path[:n] in lines:
            return lines[path[:n]]
    return None


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int) or (isinstance(part, str) and part.isdigit() and out):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out
