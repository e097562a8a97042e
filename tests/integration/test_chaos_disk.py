"""Chaos: the disk fills while kolm writes a record of truth, on a real full filesystem.

Each scenario runs the real `kolm` command inside a private mount namespace (`unshare -m`, as
root, or `unshare -r -m` through an unprivileged user namespace) in which a small tmpfs is
mounted over the store: the mount is that subprocess's alone, nothing leaks to the host, and it
goes away with it. A driver inside the namespace fills the tmpfs, runs the command, lists what
it left, frees the space and runs it again, and reports back as JSON (the tmpfs and its files
vanish when the namespace ends).

* `kolm compile` whose artifact write into the store hits ENOSPC (the compile's earlier stages
  are reused from the session's compile: only the sign stage runs): exit 1, the message names
  the artifact's path and says no space, no partial .kolm, no temp file, no reservation left;
  once the space is freed the re-run writes that same version.
* `kolm publish` whose release state write hits ENOSPC: exit 1, the message names the state
  file, the previous state is kept whole, no temp file; once freed, the publish goes through.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.chaos

ROOT = Path(__file__).resolve().parents[2]
KOLM = [sys.executable, "-m", "kolm_ray.cli"]

# Runs inside the namespace: `plan` is {"mount", "report", "steps"}; a step fills the tmpfs
# (leaving `room` bytes), frees it, or runs a command and records its exit code, its output
# and every file then on the tmpfs with its size (plus the text of the files named in `read`).
_DRIVER = r"""
import json, os, subprocess, sys

plan = json.loads(sys.argv[1])
mount = plan["mount"]
filler = os.path.join(mount, ".chaos-filler")


def files():
    out = {}
    for d, _, names in os.walk(mount):
        for n in names:
            p = os.path.join(d, n)
            if p != filler:
                out[os.path.relpath(p, mount)] = os.path.getsize(p)
    return out


results = []
for step in plan["steps"]:
    if step.get("do") == "fill":
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            while True:
                os.write(fd, bytes(1 << 16))
        except OSError as e:
            assert e.errno == 28, e  # ENOSPC: the tmpfs is full
        os.ftruncate(fd, max(0, os.fstat(fd).st_size - step["room"]))
        os.close(fd)
    elif step.get("do") == "free":
        os.unlink(filler)
    else:
        p = subprocess.run(step["run"], capture_output=True, text=True, cwd=plan["cwd"],
                           env={**os.environ, **step.get("env", {})})
        read = {n: open(os.path.join(mount, n)).read() for n in step.get("read", [])
                if os.path.isfile(os.path.join(mount, n))}
        results.append({"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr, "files": files(), "read": read})
with open(plan["report"], "w") as f:
    json.dump(results, f)
"""


@pytest.fixture(scope="module")
def private_mount(tmp_path_factory) -> list[str]:
    """The ``unshare`` prefix that lets a subprocess mount a tmpfs of its own; skips where none does."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed: no private mount namespace for a full-disk tmpfs")
    probe = tmp_path_factory.mktemp("probe")
    errors = []
    for prefix in (["unshare", "-m"], ["unshare", "-r", "-m"]):  # as root; else an unprivileged user namespace
        r = subprocess.run([*prefix, "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$1"', "sh", str(probe)],
                           capture_output=True, text=True, timeout=60)
        if r.returncode == 0:
            return prefix
        errors.append(f"{' '.join(prefix)}: {r.stderr.strip()}")
    pytest.skip("cannot mount a tmpfs in a private mount namespace (neither root nor unprivileged user namespaces "
                f"here): {'; '.join(errors)}")


def _on_a_full_tmpfs(prefix: list[str], mount: Path, size: str, steps: list[dict], tmp_path: Path) -> list[dict]:
    """Run ``steps`` with a ``size`` tmpfs mounted at ``mount`` for them alone; their reports."""
    mount.mkdir(parents=True, exist_ok=True)
    report = tmp_path / "report.json"
    plan = {"mount": str(mount), "report": str(report), "steps": steps, "cwd": str(ROOT)}
    r = subprocess.run([*prefix, "sh", "-c", f'mount -t tmpfs -o size={size} tmpfs "$1" && shift && exec "$@"', "sh",
                        str(mount), sys.executable, "-c", _DRIVER, json.dumps(plan)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert list(mount.iterdir()) == []  # the tmpfs was the namespace's alone: nothing on the host
    return json.loads(report.read_text())


def _junk(files: dict[str, int]) -> list[str]:
    """What a write that failed may not leave: a temp file, a partial artifact, a hidden marker."""
    return [f for f in files if ".tmp" in f or f.endswith(".kolm") or "/." in f"/{f}"]


@pytest.mark.slow
def test_a_compile_whose_artifact_hits_a_full_disk_exits_1_and_leaves_nothing_in_the_store(
        compiled, private_mount, tmp_path):
    assert compiled["res"].exit_code == 0, compiled["res"].output
    store = tmp_path / "store"
    artifact_size = (compiled["home"] / "artifacts" / "routing-1.0.kolm").stat().st_size
    room = 8 << 10  # the version's reservation (one page) fits; the artifact does not
    assert artifact_size > 2 * room
    compile_ = {"run": [*KOLM, *compiled["args"], "--gate", "K=60", "--out", str(store)],
                "env": dict(compiled["env"])}
    full, freed = _on_a_full_tmpfs(private_mount, store, "1m", [
        {"do": "fill", "room": room}, compile_, {"do": "free"}, compile_], tmp_path)

    assert full["rc"] == 1, full["stdout"] + full["stderr"]
    [error] = [line for line in full["stderr"].splitlines() if line.startswith("error:")]
    assert f"{store / 'routing-1.0.kolm'}: No space left on device" in error, error
    assert "nothing of it is left in the store" in error
    assert "Traceback" not in full["stderr"]
    assert _junk(full["files"]) == [] and not [f for f in full["files"] if f.startswith(".reserved/")], full["files"]

    # Space freed: the same compile writes the version the failed one gave back.
    assert freed["rc"] == 0, freed["stdout"] + freed["stderr"]
    assert freed["stdout"].strip().splitlines()[-1] == f"artifact    {store / 'routing-1.0.kolm'}"
    assert freed["files"]["routing-1.0.kolm"] > 0 and ".reserved/routing-1.0" in freed["files"]
    assert [f for f in freed["files"] if ".tmp" in f] == []


def test_a_publish_whose_release_state_hits_a_full_disk_exits_1_and_keeps_the_previous_state(
        specialists, private_mount, tmp_path):
    home = tmp_path / "home"
    stable, canary = tmp_path / "route-1.0.kolm", tmp_path / "route-1.1.kolm"
    shutil.copy(specialists["route"], stable)
    shutil.copy(specialists["route2"], canary)
    key = ["--key", str(specialists["public_key"])]
    env = {"KOLM_HOME": str(home), "RAY_ADDRESS": ""}  # no cluster: nothing to poke
    state = "envs/prod/release.json"
    first, full, freed = _on_a_full_tmpfs(private_mount, home, "256k", [
        {"run": [*KOLM, "publish", str(stable), "--to", "prod", *key], "env": env, "read": [state]},
        {"do": "fill", "room": 0},
        {"run": [*KOLM, "publish", str(canary), "--to", "prod", *key], "env": env, "read": [state]},
        {"do": "free"},
        {"run": [*KOLM, "publish", str(canary), "--to", "prod", *key], "env": env, "read": [state]},
    ], tmp_path)

    assert first["rc"] == 0, first["stderr"]
    assert full["rc"] == 1, full["stdout"] + full["stderr"]
    [error] = [line for line in full["stderr"].splitlines() if line.startswith("error:")]
    assert f"cannot write the release state {home / state}: No space left on device" in error, error
    assert "'prod' keeps its previous state (revision 1)" in error
    assert sorted(full["files"]) == ["envs/prod/release.json", "envs/prod/release.lock"]  # no temp file
    assert full["read"][state] == first["read"][state]  # the previous state, whole

    assert freed["rc"] == 0, freed["stderr"]
    after = json.loads(freed["read"][state])
    assert after["revision"] == 2 and after["releases"]["route"]["canary"]["version"] == "1.1"
