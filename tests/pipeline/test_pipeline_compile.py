"""Pipeline YAML → Executable: good input, and errors that name line and field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vela.errors import VelaError
from vela.pipeline import Executable, PipelineError, compile_pipeline, secret_env_name

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

GOOD = """\
version: "1"
steps:
  - name: build app
    image: golang:1.22
    commands:
      - go build ./...
      - echo done
    environment:
      GOFLAGS: -mod=vendor
      PORT: 8080
      DEBUG: true
    secrets: [api_key, docker_password]
    timeout: 5m
  - name: test
    commands: [go test ./...]
    timeout: 90
    failure: ignore
  - name: deploy
    commands: [./deploy.sh]
    secrets: [api_key]
    timeout: 1h30m
"""


def error(text: str) -> str:
    with pytest.raises(PipelineError) as e:
        compile_pipeline(text)
    assert isinstance(e.value, VelaError)
    return str(e.value)


def test_good_pipeline():
    ex = compile_pipeline(GOOD)
    assert [s.name for s in ex.steps] == ["build app", "test", "deploy"]
    first, second, third = ex.steps
    assert first.image == "golang:1.22" and second.image == "local"
    assert first.environment == {"GOFLAGS": "-mod=vendor", "PORT": "8080", "DEBUG": "true"}
    assert (first.timeout, second.timeout, third.timeout) == (300.0, 90.0, 5400.0)
    assert first.script() == "go build ./...\necho done"
    assert second.ignore_failure and not first.ignore_failure
    assert ex.secret_names() == ["api_key", "docker_password"]
    assert secret_env_name("api_key") == "API_KEY"


def test_json_round_trip_and_validation():
    ex = compile_pipeline(GOOD)
    assert Executable.from_json(ex.to_json()) == ex
    broken = ex.to_json().replace('"name":"test"', '"name":"build app"')
    with pytest.raises(PipelineError, match=r"steps\[1\]\.name: duplicate step name"):
        Executable.from_json(broken)
    with pytest.raises(PipelineError):
        Executable.from_json("{not json")


def test_examples_compile():
    hello = compile_pipeline((EXAMPLES / "hello.yml").read_text())
    assert hello.secret_names() == ["greeting_token"]
    failing = compile_pipeline((EXAMPLES / "failing.yml").read_text())
    assert failing.steps[0].ignore_failure


def test_bad_yaml_reports_the_line():
    msg = error('version: "1"\nsteps:\n  - name: a\n    commands: [echo, "x\n')
    assert msg.startswith("line ") and "invalid YAML" in msg
    msg = error('version: "1"\nsteps:\n  - name: a\n   commands: [x]\n')
    assert msg.startswith("line 4: invalid YAML")


def test_missing_field_names_line_and_field():
    text = 'version: "1"\nsteps:\n  - name: ok\n    commands: [x]\n  - name: b\n    image: y\n'
    assert error(text) == "line 5: steps[1].commands: field required"


def test_bad_field_value_names_line_and_field():
    text = 'version: "1"\nsteps:\n  - name: a\n    commands: [x]\n    timeout: soon\n'
    msg = error(text)
    assert msg.startswith("line 5: steps[0].timeout: 'soon' is not a duration")
    text = 'version: "1"\nsteps:\n  - name: a\n    commands: {x: 1}\n'
    assert error(text).startswith("line 4: steps[0].commands: ")
    text = 'version: "1"\nsteps:\n  - name: a\n    commands: [x]\n    failure: maybe\n'
    assert error(text).startswith("line 5: steps[0].failure: ")


def test_unknown_key():
    text = 'version: "1"\nsteps:\n  - name: a\n    commands: [x]\n    comands: [y]\nservices: []\n'
    assert error(text) == (
        "line 5: steps[0].comands: unknown key\nline 6: services: unknown key"
    )


def test_duplicate_step_names():
    text = 'version: "1"\nsteps:\n  - name: a\n    commands: [x]\n  - name: a\n    commands: [y]\n'
    assert error(text) == "line 5: steps[1].name: duplicate step name 'a'"


def test_duplicate_mapping_key():
    text = 'version: "1"\nsteps:\n  - name: a\n    commands: [x]\n    name: b\n'
    assert error(text) == "line 5: steps[0].name: duplicate key"


@pytest.mark.parametrize(
    ("step", "field"),
    [
        ("name: ../etc\n    commands: [x]", "steps[0].name"),
        ("name: 'a\\nb'\n    commands: [x]", "steps[0].name"),
        ("name: ''\n    commands: [x]", "steps[0].name"),
        ("name: a\n    commands: []", "steps[0].commands"),
        ("name: a\n    commands: [x]\n    image: 'has space'", "steps[0].image"),
        ("name: a\n    commands: [x]\n    environment: {VELA_BUILD_ID: x}",
         "steps[0].environment.VELA_BUILD_ID"),
        ("name: a\n    commands: [x]\n    environment: {'A-B': x}", "steps[0].environment.A-B"),
        ("name: a\n    commands: [x]\n    secrets: ['../x']", "steps[0].secrets[0]"),
        ("name: a\n    commands: [x]\n    secrets: [a, A]", "steps[0].secrets[1]"),
        ("name: a\n    commands: [x]\n    secrets: [tok]\n    environment: {TOK: x}",
         "steps[0].environment.TOK"),
        ("name: a\n    commands: [x]\n    timeout: 0", "steps[0].timeout"),
        ("name: a\n    commands: [x]\n    timeout: true", "steps[0].timeout"),
        ("name: a\n    commands: [x]\n    timeout: " + "9" * 400, "steps[0].timeout"),
        ("name: a\n    commands: [x]\n    timeout: -" + "9" * 400, "steps[0].timeout"),
    ],
)
def test_field_rules(step, field):
    msg = error(f'version: "1"\nsteps:\n  - {step}\n')
    assert msg.startswith("line "), msg
    assert f": {field}: " in msg, msg


def test_top_level_shapes():
    assert error("") == "line 1: pipeline is empty; expected `version` and `steps`"
    assert error("- a\n- b\n") == "line 1: pipeline must be a mapping with `version` and `steps`"
    assert error('version: "2"\nsteps: []\n') == (
        "line 1: version: input should be '1'\n"
        "line 2: steps: list should have at least 1 item after validation, not 0"
    )
    assert "version" in error('version: "2"\nsteps:\n  - name: a\n    commands: [x]\n')
    assert compile_pipeline("version: 1\nsteps:\n  - name: a\n    commands: [x]\n").version == "1"
    assert error("a: 1\n---\nb: 2\n").startswith("line 2: invalid YAML: expected a single")


def test_hostile_yaml_is_contained():
    deep = error("[" * 5000 + "]" * 5000)  # libyaml stops it first, PyYAML's parser later
    assert "nests too deeply" in deep or "exceeded maximum nesting depth" in deep
    bomb = "a: &a [x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(20)
    )
    assert "expands to" in error(bomb)
    assert "line" in error("a: &a [*a]\n")
    assert "invalid YAML value" in error("x: 2001-13-45\n")
    assert "larger than" in error("#" * 300_000)


def test_aliases_cannot_blow_a_small_pipeline_up():
    """1,000 commands named once and used by 100 steps: 8 KB of YAML that validated into
    ~100 MB (a 200 KB one would be ~20 GB) in the Scheduler. Refused before validation."""
    text = ('version: "1"\nx-commands: &cmds [' + ", ".join(["echo xxxxxxxx"] * 1000) + "]\n"
            "steps:\n" + "".join(f"  - name: s{i}\n    commands: *cmds\n" for i in range(100)))
    assert len(text) < 20_000
    assert "expands to" in error(text)
    # Anchors used a few times, as pipelines do, are fine.
    fine = ('version: "1"\nsteps:\n  - name: a\n    commands: &c [make, make test]\n'
            "  - name: b\n    commands: *c\n")
    assert [s.commands for s in compile_pipeline(fine).steps] == [["make", "make test"]] * 2


def test_a_step_longer_than_one_exec_takes_is_refused_with_its_line():
    """The system takes no argument over 128 KiB: such a step compiled, then failed to
    start with no message."""
    big = "echo " + "x" * (130 * 1024)
    msg = error(f'version: "1"\nsteps:\n  - name: a\n    commands: ["{big}"]\n')
    assert "line 4" in msg and "split them over steps" in msg
    msg = error(f'version: "1"\nsteps:\n  - name: a\n    commands: [env]\n'
                f'    environment: {{BIG: "{"y" * (130 * 1024)}"}}\n')
    assert "BIG" in msg and "bytes the system takes" in msg


def test_environment_is_text_as_written():
    """YAML types plain scalars: 1.10 was the float 1.1, 0755 the int 493, 12:30 the
    number 750 and the name ON the boolean true (refused as not a string)."""
    text = ('version: "1"\nsteps:\n  - name: a\n    commands: [env]\n    environment: &e\n'
            "      GO_VERSION: 1.10\n      MODE: 0755\n      AT: 12:30\n      ON: yes\n"
            '      PORT: 8080\n      QUOTED: "1.10"\n'
            "  - name: b\n    commands: [env]\n    environment:\n      <<: *e\n"
            "      EXTRA: 010\n")
    a, b = compile_pipeline(text).steps
    assert a.environment == {"GO_VERSION": "1.10", "MODE": "0755", "AT": "12:30", "ON": "yes",
                             "PORT": "8080", "QUOTED": "1.10"}
    assert b.environment == {**a.environment, "EXTRA": "010"}
    assert "environment.X: input should be a valid string" in error(
        'version: "1"\nsteps:\n  - name: a\n    commands: [env]\n    environment:\n'
        "      X:\n")


def test_nested_aliases_as_environment_are_walked_once(monkeypatch):
    """Each level doubled the walk that keeps environment text as written: ~600 bytes
    held the server's event loop for seconds (depth 30: minutes). Each node once now."""
    import vela.pipeline as pipeline_module

    walked: list[object] = []
    merged = pipeline_module._merged

    def counted(*args):
        walked.append(args[0])
        return merged(*args)

    monkeypatch.setattr(pipeline_module, "_merged", counted)
    anchors = ["x0: &a0 [{}]"] + [f"x{i}: &a{i} [*a{i - 1}, *a{i - 1}]" for i in range(1, 17)]
    text = ("anchors:\n" + "".join(f"  {a}\n" for a in anchors)
            + "version: '1'\nsteps:\n  - name: a\n    commands: [make]\n"
              "    environment: *a16\n")
    assert "environment" in error(text)
    assert len(walked) < 10  # 2**16 walks before


@pytest.mark.parametrize(("value", "seconds"), [("0x258", 600.0), ("1:30", 90.0)])
def test_an_alias_in_the_environment_leaves_its_other_uses_typed(value, seconds):
    text = (f"version: '1'\nsteps:\n  - name: a\n    commands: [make]\n"
            f"    timeout: &t {value}\n    environment: {{T: *t}}\n")
    step = compile_pipeline(text).steps[0]
    assert (step.timeout, step.environment) == (seconds, {"T": value})


def test_an_environment_first_met_as_a_step_template_is_text_too():
    text = ("version: 1\nsteps:\n  - <<: &t {timeout: 1.10}\n    name: a\n"
            "    commands: [x]\n  - name: b\n    commands: [x]\n    environment: *t\n")
    assert compile_pipeline(text).steps[1].environment == {"timeout": "1.10"}


def test_more_variables_than_the_sandbox_takes_are_refused():
    """bubblewrap takes 9,000 arguments, three per variable: 3,000 compiled, then every
    step failed to start."""
    env = ", ".join(f"V{i}: x" for i in range(1001))
    msg = error(f'version: "1"\nsteps:\n  - name: a\n    commands: [env]\n'
                f"    environment: {{{env}}}\n")
    assert "environment" in msg and "1000" in msg


def test_many_errors_are_capped():
    steps = "".join(f"  - name: s{i}\n" for i in range(40))
    msg = error(f'version: "1"\nsteps:\n{steps}')
    assert msg.count("\n") == 20 and msg.endswith("more problems")


KEYS = st.sampled_from(
    ["version", "steps", "name", "image", "commands", "environment", "secrets", "timeout",
     "failure", "key", "type", "target", "x", "", "1"]
)
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20),
    st.sampled_from(["1", "ignore", "5m", "a", "API_KEY", "-1s", "1h30m", "shared",
                     "a/b/c"]),
)
STRUCTURES = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.one_of(KEYS, st.integers()), children, max_size=6),
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(STRUCTURES)
def test_fuzz_structures_only_raise_pipeline_error(data):
    text = yaml.safe_dump(data)
    try:
        compile_pipeline(text)
    except PipelineError:
        pass
    text = yaml.safe_dump({"version": "1", "steps": [data]})
    try:
        compile_pipeline(text)
    except PipelineError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
def test_fuzz_text_only_raises_pipeline_error(text):
    try:
        compile_pipeline(text)
    except PipelineError:
        pass
    try:
        compile_pipeline('version: "1"\nsteps:\n  - ' + text)
    except PipelineError:
        pass
