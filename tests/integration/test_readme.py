"""README.md runs as written: every ```bash and ```python block, in order, in one shell, from the
root of a fresh copy of the repository, with an empty home and none of the suite's settings. A
block the test may not run says why in a ``<!-- readme-test: skip (...) -->`` line above it.

Why not a code-block plugin (pytest-codeblocks and kin): they run each block in its own shell
(or merge them into one test with no way to stop what a block left running), while the README is
one session: `export`s carry over, a stand-in teacher started with `&` and a Ray head started by
`ray start --head` live across blocks, and the head must be stopped by its own temp dir after,
never with `ray stop`, which would also stop the suite's own cluster.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
FENCE = re.compile(
    r"(?:<!--\s*readme-test:\s*skip\s*\((?P<why>[^\n]*?)\)\s*-->\n)?^```(?P<lang>[a-z]*)\n(?P<body>.*?)^```$",
    re.S | re.M,
)
# Ray's own output that a user must not see from a kolm command (it goes to the run's ray.log).
RAY_NOISE = ("core_worker.cc", "Token authentication is enabled", "Progress bars disabled",
             "streaming_executor", "(raylet)", "Traceback")


@dataclass(frozen=True)
class Block:
    line: int
    lang: str
    body: str
    skip: str | None


def readme_blocks(text: str) -> list[Block]:
    return [Block(line=text.count("\n", 0, m.start("body")), lang=m["lang"], body=m["body"], skip=m["why"])
            for m in FENCE.finditer(text)]


def test_readme_blocks_are_parsed_and_skips_say_why():
    blocks = readme_blocks(README.read_text())
    runnable = [b for b in blocks if b.lang in ("bash", "python") and b.skip is None]
    assert len(runnable) >= 12
    assert all(b.skip.strip() for b in blocks if b.skip is not None)
    # A command block that is neither run nor skipped with a reason would be untested.
    assert all(b.lang in ("bash", "python", "text") for b in blocks), [b.line for b in blocks if b.lang == ""]


def _script(blocks: list[Block], workdir: Path) -> str:
    # `::: at N s` (seconds since the script began) before each block: the log says which step took long.
    out = ["set -euo pipefail"]
    for i, b in enumerate(blocks):
        if b.skip is not None or b.lang not in ("bash", "python"):
            continue
        out.append('echo "::: at ${SECONDS} s"')
        out.append(f"echo '::: README.md:{b.line}'")
        if b.lang == "bash":
            out.append(b.body)
        else:
            path = workdir / f"readme-block-{i}.py"
            path.write_text(b.body)
            out.append(f"python {path}")
    out.append('echo "::: at ${SECONDS} s"')
    out.append("echo '::: done'")
    return "\n".join(out) + "\n"


def _fresh_copy(dest: Path) -> None:
    """What a fresh clone has: the tracked files and any new ones not ignored; the venv linked."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    (dest / ".venv").symlink_to(ROOT / ".venv")


def _clean_env(home: Path, ray_tmp: Path) -> dict[str, str]:
    venv_bin = str(ROOT / ".venv" / "bin")
    keep = {k: v for k, v in os.environ.items()
            if not k.startswith(("RAY_", "KOLM_", "ANTHROPIC_", "PYTEST_", "VIRTUAL_ENV"))}
    keep["PATH"] = ":".join(p for p in os.environ.get("PATH", "").split(":") if p and p != venv_bin)
    keep.update(HOME=str(home), RAY_TMPDIR=str(ray_tmp), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    # DeepSpeed JIT-builds its CPU shared-memory collective op (deepspeed_shm_comm, C++ against
    # torch's headers) into ~/.cache/torch_extensions the first time a fit starts: with the empty
    # home, every run of this test rebuilt it (40 s on an idle 2-core machine, minutes on a busy
    # one). The build is DeepSpeed's, not the README's: share the suite's own cache.
    keep.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    return keep


def _by_block(log: str) -> dict[str, str]:
    parts = re.split(r"^::: (README\.md:\d+|done)$", log, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


@pytest.mark.timeout(2400)
def test_readme_runs_as_written(tmp_path: Path):
    from kolm_ray.testing.cluster import kill_by_temp_dir

    repo, home = tmp_path / "repo", tmp_path / "home"
    repo.mkdir()
    home.mkdir()
    ray_tmp = Path(tempfile.mkdtemp(prefix="rdm-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    _fresh_copy(repo)
    blocks = readme_blocks((repo / "README.md").read_text())
    script = tmp_path / "readme.sh"
    script.write_text(_script(blocks, tmp_path))
    log_path = tmp_path / "readme.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(["bash", str(script)], cwd=repo, env=_clean_env(home, ray_tmp), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=2200)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            # The stand-in teacher (`&`) shares the script's process group; the head does not.
            subprocess.run(["pkill", "-KILL", "-g", str(proc.pid)], check=False)
            kill_by_temp_dir(ray_tmp)
    log = log_path.read_text()
    reached = re.findall(r"^::: (README\.md:\d+)$", log, flags=re.M)
    assert rc == 0 and log.rstrip().endswith("::: done"), (
        f"README block at {reached[-1] if reached else '?'} failed (exit {rc}):\n{log[-6000:]}")

    out = _by_block(log)
    compiles = [text for text in out.values() if re.search(r"^signed {4,}", text, re.M)]
    assert len(compiles) >= 2, "the README's compiles should each sign a version"
    for text in compiles:
        assert not [n for n in RAY_NOISE if n in text], f"Ray's own output reached the user:\n{text[-3000:]}"
        assert "recorded answers" in text and "paid now" not in text
    assert "routing-1.1.kolm" in compiles[1]
    assert sum("unchanged   identical inputs to routing-1.0" in t for t in out.values()) >= 2  # again, and as a job
    assert "promote" in log and "promoted    routing@1.1" in log
    assert re.search(r"^routing\s+unchanged\s", log, re.M), "the nightly spec's inputs are the released version's"
