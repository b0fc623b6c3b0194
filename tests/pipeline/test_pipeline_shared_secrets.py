"""A step names a team's (shared) secret by its full path, Vela's ``key: org/team/name``
with ``type: shared``, beside the names of repo and org secrets."""

from __future__ import annotations

import pytest

from vela.pipeline import (
    MAX_STEP_VARIABLES,
    Executable,
    PipelineError,
    SharedSecret,
    compile_pipeline,
)

SHARED = """\
version: "1"
steps:
  - name: deploy
    commands: [./deploy.sh]
    secrets:
      - api_key
      - key: acme/ops/deploy_key
        type: shared
        target: DEPLOY_TOKEN
      - key: acme/ops/registry_password
        type: shared
"""


def error(text: str) -> str:
    with pytest.raises(PipelineError) as e:
        compile_pipeline(text)
    return str(e.value)


def step_with(secrets: str, extra: str = "") -> str:
    return f'version: "1"\nsteps:\n  - name: a\n    commands: [x]\n    secrets:\n{secrets}{extra}'


def test_a_shared_secret_is_named_by_its_key_and_lands_in_its_target():
    ex = compile_pipeline(SHARED)
    (step,) = ex.steps
    assert step.secrets[1] == SharedSecret(key="acme/ops/deploy_key", type="shared",
                                           target="DEPLOY_TOKEN")
    # Without a target, the variable is the name in upper case, as for a repo secret.
    assert step.secret_variables() == {"API_KEY": "api_key",
                                       "DEPLOY_TOKEN": "acme/ops/deploy_key",
                                       "REGISTRY_PASSWORD": "acme/ops/registry_password"}
    assert ex.secret_names() == ["acme/ops/deploy_key", "acme/ops/registry_password", "api_key"]
    assert Executable.from_json(ex.to_json()) == ex


def test_a_pipeline_with_names_only_is_stored_as_before():
    ex = compile_pipeline('version: "1"\nsteps:\n  - name: a\n    commands: [x]\n'
                          "    secrets: [api_key]\n")
    assert '"secrets":["api_key"]' in ex.to_json()
    assert ex.steps[0].secret_variables() == {"API_KEY": "api_key"}


@pytest.mark.parametrize(("entry", "field", "message"), [
    ("      - key: acme/deploy_key\n        type: shared\n", "steps[0].secrets[0].key",
     "org/team/name"),
    ("      - key: acme/ops/team/x\n        type: shared\n", "steps[0].secrets[0].key",
     "org/team/name"),
    ("      - key: acme/o ps/x\n        type: shared\n", "steps[0].secrets[0].key",
     "org/team/name"),
    ("      - key: acme/ops/deploy-key\n        type: shared\n", "steps[0].secrets[0].key",
     "org/team/name"),
    ("      - key: acme/ops/x\n", "steps[0].secrets[0].type", "field required"),
    ("      - key: acme/ops/x\n        type: org\n", "steps[0].secrets[0].type", "'shared'"),
    ("      - key: acme/ops/x\n        type: shared\n        target: 1X\n",
     "steps[0].secrets[0].target", "not a valid variable name"),
    ("      - key: acme/ops/x\n        type: shared\n        target: VELA_TOKEN\n",
     "steps[0].secrets[0].target", "set by Vela"),
    ("      - key: acme/ops/x\n        type: shared\n        origin: vault\n",
     "steps[0].secrets[0].origin", "unknown key"),
    ("      - [acme, ops, x]\n", "steps[0].secrets[0]", "a name, or a mapping"),
    ("      - api_key\n      - key: acme/ops/x\n        type: shared\n        target: API_KEY\n",
     "steps[0].secrets[1]", "API_KEY"),
    ("      - key: acme/ops/api_key\n        type: shared\n      - api_key\n",
     "steps[0].secrets[1]", "API_KEY"),
])
def test_bad_shared_entries_name_line_and_field(entry, field, message):
    msg = error(step_with(entry))
    assert msg.startswith("line "), msg
    assert f": {field}: " in msg and message in msg, msg


def test_a_target_the_environment_sets_too_is_refused():
    msg = error(step_with("      - key: acme/ops/x\n        type: shared\n        target: TOK\n",
                          "    environment: {TOK: x}\n"))
    assert "steps[0].environment.TOK" in msg and "acme/ops/x" in msg


def test_shared_secrets_count_towards_the_variables_a_step_may_set():
    env = ", ".join(f"V{i}: x" for i in range(MAX_STEP_VARIABLES - 1))
    two = ("      - key: acme/ops/a\n        type: shared\n"
           "      - key: acme/ops/b\n        type: shared\n")
    msg = error(step_with(two, f"    environment: {{{env}}}\n"))
    assert "more than 1000 variables" in msg
    one = "      - key: acme/ops/a\n        type: shared\n"
    assert len(compile_pipeline(step_with(one, f"    environment: {{{env}}}\n"))
               .steps[0].secret_variables()) == 1


def test_a_default_variable_follows_the_variable_rules_as_a_target_does():
    """Without a target the variable is the name upper-cased: VELA_* is Vela's there
    too (target: VELA_TOKEN is refused; so is the name vela_token left to default)."""
    msg = error(step_with("      - key: acme/ops/vela_token\n        type: shared\n"))
    assert msg.startswith("line 6: steps[0].secrets[0].key: "), msg
    assert "VELA_TOKEN" in msg and "set by Vela" in msg and "target" in msg, msg
    ok = compile_pipeline(step_with("      - key: acme/ops/vela_token\n        type: shared\n"
                                    "        target: TOKEN\n"))
    assert ok.steps[0].secret_variables() == {"TOKEN": "acme/ops/vela_token"}


@pytest.mark.parametrize("name", ["ON", "NO", "Yes", "TRUE", "off"])
def test_a_target_is_text_as_written_as_an_environment_name_is(name):
    """YAML would make ON, NO, Yes... booleans; a target is a variable's name, as an
    environment's names are, which the step gets as written."""
    text = step_with(f"      - key: acme/ops/x\n        type: shared\n        target: {name}\n")
    assert compile_pipeline(text).steps[0].secret_variables() == {name: "acme/ops/x"}
    env = compile_pipeline(f'version: "1"\nsteps:\n  - name: a\n    commands: [x]\n'
                           f"    environment: {{{name}: v}}\n")
    assert env.steps[0].environment == {name: "v"}


@pytest.mark.parametrize("name", ["on", "no", "yes", "true", "off"])
def test_a_plain_secret_name_is_text_as_written(name):
    """`secrets: [on]` names the secret "on" (the step gets $ON); YAML would make it
    the boolean true and the pipeline be refused as "not a string"."""
    text = (f'version: "1"\nsteps:\n  - name: a\n    commands: [x]\n'
            f"    secrets: [{name}, api_key]\n")
    assert compile_pipeline(text).steps[0].secret_variables() == {
        name.upper(): name, "API_KEY": "api_key"}
