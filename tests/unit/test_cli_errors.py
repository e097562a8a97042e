"""Every `kolm` command on wrong input: the documented exit code (2 bad input or arguments, 1 a
runtime failure such as a rejected signature), exactly one `error:` line on stderr, never a
traceback. The commands are walked from the group, so a new command fails
`test_every_command_has_bad_inputs` until it gets its own rows in BAD.

Nothing here starts Ray: every input fails at the edge, and `cluster.connect` is made to fail the
test if a command got that far. `kolm queue` and `kolm cancel` connect to Ray before they read
anything of their own, so only their argument errors are swept here.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from kolm_ray.artifact import ARTIFACT_FORMAT_VERSION, pack
from kolm_ray.cli import cli
from kolm_ray.cli.app import _KolmGroup
from kolm_ray.signing import KeySigner, ensure_default_key

RUNNER = CliRunner()
BASE = "qwen-2.5-3b-instruct"  # a short name: resolves without a download


@dataclass(frozen=True)
class Bad:
    """One wrong invocation: ``args`` with {placeholders} for the files `inputs` writes."""

    name: str
    args: list[str]
    code: int
    words: str  # in the one error line
    env: dict[str, str] = field(default_factory=dict)
    setup: Callable[[dict[str, Path]], None] | None = None


def _compile(*extra: str, examples: str = "{rows}", holdout: str = "{rows}") -> list[str]:
    return ["compile", "route the message", "--examples", examples, "--eval", holdout, "--base", BASE, *extra]


def _malformed_limits(f: dict[str, Path]) -> None:
    (f["home"] / "teacher-limits.json").write_text('{"format_version": 1,')


KEY = {"ANTHROPIC_API_KEY": "not-used"}

BAD: dict[str, list[Bad]] = {
    "": [Bad("unknown-command", ["nope"], 2, "No such command")],
    "compile": [
        Bad("missing-file", _compile(examples="{missing}"), 2, "missing.jsonl: file not found"),
        Bad("directory-for-file", _compile(examples="{dir}"), 2, "is a directory"),
        Bad("kolm-for-jsonl", _compile(examples="{art}"), 2, "is a .kolm artifact, not rows"),
        Bad("binary-garbage", _compile(holdout="{garbage}"), 2, "garbage.bin: is a binary file"),
        Bad("malformed-line", _compile(examples="{malformed}"), 2, "malformed.jsonl:2: malformed JSON"),
        Bad("no-api-key", _compile(), 2, "set ANTHROPIC_API_KEY"),
        Bad("bad-gate", _compile("--gate", "K=abc"), 2, "invalid --gate"),
        Bad("bad-k", _compile("--k", "0"), 2, "'--k'"),
        Bad("bad-sign", _compile("--sign", "gpg"), 2, "invalid --sign", env=KEY),
        Bad("unknown-base", ["compile", "t", "--examples", "{rows}", "--eval", "{rows}", "--base", "no!"], 2,
            "unknown base model"),
        Bad("non-utf8-task-file", ["compile", "--task-file", "{garbage}", "--examples", "{rows}", "--eval", "{rows}",
                                   "--base", BASE], 2, "task file is not UTF-8"),
    ],
    "sample": [
        Bad("missing-file", ["sample", "t", "--examples", "{missing}"], 2, "file not found"),
        Bad("directory-for-file", ["sample", "t", "--examples", "{dir}"], 2, "is a directory"),
        Bad("kolm-for-jsonl", ["sample", "t", "--examples", "{art}"], 2, "is a .kolm artifact"),
        Bad("binary-garbage", ["sample", "t", "--examples", "{garbage}"], 2, "is a binary file"),
        Bad("malformed-line", ["sample", "t", "--examples", "{malformed}"], 2, "malformed.jsonl:2:"),
        Bad("no-api-key", ["sample", "t", "--examples", "{rows}"], 2, "set ANTHROPIC_API_KEY"),
        Bad("no-task", ["sample", "--examples", "{rows}"], 2, "give the task instruction"),
        Bad("bad-k", ["sample", "t", "--examples", "{rows}", "--k", "0"], 2, "'--k'"),
    ],
    "score": [
        Bad("missing-file", ["score", "{missing}", "--verifier", "{art}"], 2, "file not found"),
        Bad("kolm-for-jsonl", ["score", "{art}", "--verifier", "{art}"], 2, "is a .kolm artifact"),
        Bad("malformed-line", ["score", "{malformed}", "--verifier", "{art}"], 2, "malformed.jsonl:2:"),
        Bad("garbage-verifier", ["score", "{rows}", "--verifier", "{garbage}"], 2, "not a verifier"),
        Bad("jsonl-verifier", ["score", "{rows}", "--verifier", "{malformed}"], 2, "verifier is not valid JSON"),
        Bad("tampered-verifier-artifact", ["score", "{rows}", "--verifier", "{tampered}"], 1,
            "changed after signing"),
        Bad("private-key", ["score", "{rows}", "--verifier", "{art}", "--key", "{private}"], 2, "is a private key"),
        Bad("no-verifier", ["score", "{rows}"], 2, "give exactly one of --verifier"),
        Bad("examples-without-task", ["score", "{rows}", "--examples", "{rows}"], 2, "--examples needs --task"),
    ],
    "verify": [
        Bad("missing-file", ["verify", "{missing}"], 2, "artifact not found"),
        Bad("directory-for-file", ["verify", "{dir}"], 2, "is a directory"),
        Bad("jsonl-for-kolm", ["verify", "{rows}"], 2, "not a readable .kolm artifact"),
        Bad("binary-garbage", ["verify", "{garbage}"], 2, "not a readable .kolm artifact"),
        Bad("private-key", ["verify", "{art}", "--key", "{private}"], 2,
            "signing.pem is a private key: give the public key (signing.pub beside it)"),
        Bad("non-pem-key", ["verify", "{art}", "--key", "{rows}"], 2, "is not a PEM file"),
        Bad("tampered", ["verify", "{tampered}"], 1, "adapter/adapter_model.safetensors changed after signing"),
        Bad("identity-without-issuer", ["verify", "{art}", "--identity", "me@example.com"], 2, "needs --key"),
        Bad("no-default-key", ["verify", "{art}"], 2, "no default public key",
            setup=lambda f: [p.unlink() for p in (f["home"] / "keys").iterdir()]),
    ],
    "inspect": [
        Bad("missing-file", ["inspect", "{missing}"], 2, "artifact not found"),
        Bad("directory-for-file", ["inspect", "{dir}"], 2, "is a directory"),
        Bad("jsonl-for-kolm", ["inspect", "{rows}"], 2, "not a readable .kolm artifact"),
        Bad("binary-garbage", ["inspect", "{garbage}"], 2, "not a readable .kolm artifact"),
    ],
    "compare": [
        Bad("missing-file", ["compare", "{missing}", "{art}"], 2, "artifact not found"),
        Bad("jsonl-for-kolm", ["compare", "{rows}", "{art}"], 2, "not a readable .kolm artifact"),
        Bad("private-key", ["compare", "{art}", "{art}", "--key", "{private}"], 2, "is a private key"),
        Bad("tampered", ["compare", "{tampered}", "{art}"], 1, "tampered.kolm: signature verification failed"),
        Bad("bad-tolerance", ["compare", "{art}", "{art}", "--tolerance", "-1"], 2, "'--tolerance'"),
    ],
    "base": [Bad("unknown-subcommand", ["base", "huge"], 2, "No such command")],
    "base tiny": [
        Bad("file-for-directory", ["base", "tiny", "{rows}"], 2, "is a file"),
        Bad("odd-hidden-size", ["base", "tiny", "{tmp}/b", "--hidden-size", "20"], 2, "multiple of 8"),
        Bad("bad-layers", ["base", "tiny", "{tmp}/b", "--layers", "0"], 2, "'--layers'"),
    ],
    "serve": [
        Bad("missing-file", ["serve", "{missing}"], 2, "artifact not found"),
        Bad("directory-for-file", ["serve", "{dir}"], 2, "is a directory"),
        Bad("jsonl-for-kolm", ["serve", "{rows}", "--emit-config", "{tmp}/s.json"], 2, "nothing to serve"),
        Bad("tampered", ["serve", "{tampered}", "--emit-config", "{tmp}/s.json"], 2, "nothing to serve"),
        Bad("private-key", ["serve", "{art}", "--key", "{private}"], 2, "is a private key"),
        Bad("garbage-api-keys", ["serve", "{art}", "--api-keys", "{garbage}"], 2, "cannot read the API keys file"),
        Bad("bad-port", ["serve", "{art}", "--port", "0"], 2, "'--port'"),
        Bad("env-and-artifacts", ["serve", "{art}", "--env", "prod"], 2, "give no ARTIFACTS"),
    ],
    "receipts": [Bad("unknown-subcommand", ["receipts", "check"], 2, "No such command")],
    "receipts verify": [
        Bad("no-receipts", ["receipts", "verify"], 2, "no receipts here"),
        Bad("file-for-directory", ["receipts", "verify", "--store", "{rows}"], 2, "is a file"),
    ],
    "publish": [
        Bad("missing-file", ["publish", "{missing}", "--to", "prod"], 2, "artifact not found"),
        Bad("jsonl-for-kolm", ["publish", "{rows}", "--to", "prod"], 2, "not a readable .kolm artifact"),
        Bad("private-key", ["publish", "{art}", "--to", "prod", "--key", "{private}"], 2, "is a private key"),
        Bad("tampered", ["publish", "{tampered}", "--to", "prod"], 1, "changed after signing"),
        Bad("bad-env-name", ["publish", "{art}", "--to", "Prod!"], 2, "invalid environment name"),
        Bad("bad-hold", ["publish", "{art}", "--to", "prod", "--hold", "soon"], 2, "invalid duration"),
        Bad("bad-canary", ["publish", "{art}", "--to", "prod", "--canary", "0"], 2, "'--canary'"),
    ],
    "report": [
        Bad("no-such-env", ["report", "--env", "prod"], 2, "no environment 'prod'"),
        Bad("bad-since", ["report", "--env", "prod", "--since", "soon"], 2, "invalid duration"),
        Bad("missing-prices", ["report", "--env", "prod", "--prices", "{missing}"], 2, "price file not found"),
    ],
    "status": [
        Bad("no-such-env", ["status", "--env", "prod"], 2, "no environment 'prod'"),
        Bad("bad-env-name", ["status", "--env", "Prod!"], 2, "invalid environment name"),
        Bad("missing-env", ["status"], 2, "Missing option '--env'"),
    ],
    "promote": [
        Bad("not-released", ["promote", "routing", "--env", "prod"], 2, "is not released in 'prod'"),
        Bad("missing-env", ["promote", "routing"], 2, "Missing option '--env'"),
    ],
    "rollback": [
        Bad("not-released", ["rollback", "routing", "--env", "prod"], 2, "is not released in 'prod'"),
        Bad("missing-env", ["rollback", "routing"], 2, "Missing option '--env'"),
    ],
    "queue": [Bad("unknown-option", ["queue", "--every"], 2, "No such option")],  # Ray before anything else
    "queue limits": [
        Bad("limit-not-a-number", ["queue", "limits", "--tenant-limit", "acme=x"], 2, "whole number"),
        Bad("limit-without-equals", ["queue", "limits", "--tenant-limit", "acme"], 2, "use KEY=VALUE"),
        Bad("bad-max-running", ["queue", "limits", "--max-running", "0"], 2, "'--max-running'"),
    ],
    "cancel": [Bad("no-ticket", ["cancel"], 2, "Missing argument")],  # Ray before the ticket is looked up
    "teacher-limits": [Bad("unknown-subcommand", ["teacher-limits", "get"], 2, "No such command")],
    "teacher-limits set": [
        Bad("budget-without-tenant", ["teacher-limits", "set", "--budget-usd", "5"], 2, "give --tenant"),
        Bad("not-a-key-digest", ["teacher-limits", "set", "--key", "zz", "--max-in-flight", "4"], 2,
            "not a key digest"),
        Bad("bad-max-in-flight", ["teacher-limits", "set", "--max-in-flight", "0"], 2, "'--max-in-flight'"),
    ],
    "teacher-limits show": [
        Bad("malformed-limits-file", ["teacher-limits", "show"], 2, "malformed JSON", setup=_malformed_limits),
    ],
}


def _paths(cmd: click.Command, path: tuple[str, ...] = ()):
    yield " ".join(path)
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            yield from _paths(sub, (*path, name))


def test_every_command_has_bad_inputs():
    assert set(_paths(cli)) == set(BAD), "add rows to BAD for a new command (and drop rows of a removed one)"


@pytest.fixture
def inputs(tmp_path: Path, kolm_home: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Good and bad files, and a Specialist artifact signed with kolm's own key (and a tampered copy)."""
    import kolm_ray.cluster

    def no_ray(*a, **k):
        raise AssertionError("a wrong input got past the edge: the command would start Ray")

    monkeypatch.setattr(kolm_ray.cluster, "connect", no_ray)
    for var in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "KOLM_DEBUG", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    art = signed_artifact(tmp_path / "store")
    f = {
        "tmp": tmp_path, "home": kolm_home, "art": art, "tampered": tampered(art, tmp_path / "tampered.kolm"),
        "rows": tmp_path / "rows.jsonl", "malformed": tmp_path / "malformed.jsonl",
        "garbage": tmp_path / "garbage.bin", "missing": tmp_path / "missing.jsonl", "dir": tmp_path / "a-folder",
        "private": kolm_home / "keys" / "signing.pem",
    }
    f["rows"].write_text('{"input": "I was charged twice", "output": "billing"}\n'
                         '{"input": "I want a demo", "output": "sales"}\n')
    f["malformed"].write_text('{"input": "I was charged twice", "output": "billing"}\n{"input": "I want\n')
    f["garbage"].write_bytes(bytes(range(256)) * 8)
    f["dir"].mkdir()
    return f


def signed_artifact(store: Path) -> Path:
    """A small artifact of the real layout (manifest, verifier, adapter), signed with kolm's own key."""
    from kolm_ray.verifier import synthesize

    content = store.parent / "content"
    (content / "adapter").mkdir(parents=True)
    (content / "adapter" / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 16)
    verifier = synthesize("Route the message to one of: billing, sales.", ["billing", "sales"])
    (content / "verifier.json").write_text(verifier.to_json())
    (content / "manifest.json").write_text(json.dumps({
        "format_version": ARTIFACT_FORMAT_VERSION, "name": "route", "version": "1.0",
        "kscore": {"student": {"k": 90.0}}}))
    sig = store.parent / "content.sig"
    KeySigner(ensure_default_key()).sign(content, sig)
    return pack(content, sig, store / "route-1.0.kolm")


def tampered(art: Path, dest: Path) -> Path:
    """A copy of ``art`` with one byte of its adapter flipped, signature kept."""
    with tarfile.open(art) as src, tarfile.open(dest, "w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            if m.name.endswith("adapter_model.safetensors"):
                data = data[:-1] + bytes([data[-1] ^ 1])
            dst.addfile(m, io.BytesIO(data))
    return dest


def assert_one_error(res, code: int, words: str) -> str:
    """The exit code, exactly one `error:` line (click's usage errors print `Error:`) holding
    ``words``, no traceback, and no exception escaping the command. Returns the error line."""
    everything = res.stdout + res.stderr
    assert "Traceback" not in everything, everything
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert res.exit_code == code, everything
    errors = [line for line in res.stderr.splitlines() if line.lower().startswith("error:")]
    assert len(errors) == 1, res.stderr
    assert words in errors[0], errors[0]
    return errors[0]


CASES = [pytest.param(bad, id=f"{path or 'kolm'}:{bad.name}") for path, bads in BAD.items() for bad in bads]


@pytest.mark.parametrize("bad", CASES)
def test_wrong_input_is_one_error_line_with_the_documented_exit_code(bad: Bad, inputs):
    if bad.setup:
        bad.setup(inputs)
    args = [a.format(**inputs) for a in bad.args]
    assert_one_error(RUNNER.invoke(cli, args, env=bad.env), bad.code, bad.words)


# ----- trust: kolm's own key by default, and every command says whom it trusted ------------------


def test_verify_without_key_trusts_kolms_own_key_and_says_so(inputs):
    res = RUNNER.invoke(cli, ["verify", str(inputs["art"])])
    assert res.exit_code == 0, res.output
    pub = inputs["home"] / "keys" / "signing.pub"
    assert res.stderr.splitlines() == [f"trusted     key {pub} (kolm's own)"]
    assert res.stdout.strip() == (f"verified    {inputs['art']}: route 1.0, K 90.0, "
                                  f"signed by key {pub} (kolm's own)")


def test_verify_with_an_explicit_key_names_it(inputs, tmp_path):
    pub = tmp_path / "copy.pub"
    pub.write_bytes((inputs["home"] / "keys" / "signing.pub").read_bytes())
    res = RUNNER.invoke(cli, ["verify", str(inputs["art"]), "--key", str(pub)])
    assert res.exit_code == 0, res.output
    assert res.stderr.strip() == f"trusted     key {pub}" and f"signed by key {pub}" in res.stdout


def test_score_reads_the_verifier_out_of_a_signed_artifact(inputs, tmp_path):
    outputs = tmp_path / "outputs.jsonl"
    outputs.write_text('{"input": "charged twice", "output": "billing"}\n{"input": "a demo", "output": "maybe"}\n')
    res = RUNNER.invoke(cli, ["score", str(outputs), "--verifier", str(inputs["art"]), "--json"])
    assert res.exit_code == 0, res.output
    assert "trusted     key" in res.stderr and "(signature verified)" in res.stderr
    scores = json.loads(res.stdout)
    assert (scores["n"], scores["passed"]) == (2, 1)  # "maybe" is not one of the artifact's labels


@pytest.mark.parametrize("command", [["compare", "{art}", "{art}"], ["publish", "{art}", "--to", "prod"]])
def test_commands_that_read_artifacts_say_which_key_they_trusted(command, inputs):
    res = RUNNER.invoke(cli, [a.format(**inputs) for a in command])
    assert f"trusted     key {inputs['home'] / 'keys' / 'signing.pub'} (kolm's own)" in res.stderr.splitlines()


# ----- the group's safety net: what escapes a command ----------------------------------------------


@pytest.fixture
def net(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A group with the real safety net and commands that raise what a command could let escape."""
    monkeypatch.delenv("KOLM_DEBUG", raising=False)
    binary = tmp_path / "prices.bin"
    binary.write_bytes(b"\xff\xfe{}")
    broken = tmp_path / "prices.json"
    broken.write_text('{"model": \n  1,,}')

    group = _KolmGroup(name="kolm")
    raisers = {
        "missing": lambda: open(tmp_path / "nope.json"),  # noqa: SIM115
        "folder": lambda: open(tmp_path),  # noqa: SIM115
        "not-utf8": lambda: binary.read_text(encoding="utf-8"),
        "not-json": lambda: json.loads(Path(broken).read_text()),
        "bug": lambda: {}["stage"],
        "ctrl-c": lambda: (_ for _ in ()).throw(KeyboardInterrupt()),
        "exit-5": lambda: (_ for _ in ()).throw(SystemExit(5)),
        "usage": lambda: (_ for _ in ()).throw(click.BadParameter("nope", param_hint="'--x'")),
    }
    for name, raise_it in raisers.items():
        group.add_command(click.Command(name, callback=raise_it))
    return group, tmp_path


@pytest.mark.parametrize("command, words", [
    ("missing", "nope.json: no such file or directory"),
    ("folder", ": is a directory, expected a file"),
    ("not-utf8", "prices.bin: not UTF-8 text"),
    ("not-json", "prices.json:2: not valid JSON (Expecting property name"),
])
def test_a_users_file_mistake_that_escapes_is_one_line_naming_the_path_exit_2(net, command, words):
    group, tmp_path = net
    line = assert_one_error(RUNNER.invoke(group, [command]), 2, words)
    assert str(tmp_path) in line


def test_an_unexpected_exception_is_an_internal_error_line_exit_1(net):
    group, _ = net
    line = assert_one_error(RUNNER.invoke(group, ["bug"]), 1, "internal error: KeyError: 'stage'")
    assert line.endswith("(run with KOLM_DEBUG=1 for the traceback)")


def test_kolm_debug_shows_the_traceback(net):
    group, _ = net
    res = RUNNER.invoke(group, ["bug"], env={"KOLM_DEBUG": "1"})
    assert res.exit_code == 1 and "Traceback" in res.stderr and 'KeyError: \'stage\'' in res.stderr
    assert res.stderr.splitlines()[-1].startswith("error: internal error: KeyError")


def test_ctrl_c_exits_and_click_errors_pass_through_untouched(net):
    group, _ = net
    interrupted = RUNNER.invoke(group, ["ctrl-c"])
    assert interrupted.exit_code == 1 and "Aborted!" in interrupted.stderr and "internal error" not in interrupted.stderr
    assert RUNNER.invoke(group, ["exit-5"]).exit_code == 5
    usage = RUNNER.invoke(group, ["usage"])
    assert usage.exit_code == 2 and "Error: Invalid value for '--x': nope" in usage.stderr
    assert "internal error" not in usage.stderr
