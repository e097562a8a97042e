"""kolm's default signing key: one test per attack on its creation."""

import multiprocessing
import os
import time

from kolm_ray.signing import KeySigner, default_key_paths, ensure_default_key

FIRST_RUNS = 8


def _first_run(barrier, results) -> None:
    """One `kolm compile`'s first use of the default key, released with the others at once."""
    from cryptography.hazmat.primitives.asymmetric import ec

    generate = ec.generate_private_key

    def slow_generate(*args, **kwargs):
        time.sleep(0.3)  # a loaded host: every run is past "no key yet" before the first key exists
        return generate(*args, **kwargs)

    ec.generate_private_key = slow_generate
    said = []
    try:
        barrier.wait()
        priv = ensure_default_key(said.append)
        _, pub = default_key_paths()
        # What a reader does the moment it has the private key: find the public half beside it.
        results.put(("ok", str(priv), KeySigner(priv).public_pem(), pub.read_bytes(), len(said)))
    except BaseException as e:  # noqa: BLE001 - reported to the test, in its process
        results.put(("error", f"{type(e).__name__}: {e}"))


def test_first_runs_at_once_end_with_one_valid_pair_and_no_crash(kolm_home):
    """On main, every run but the fastest died with FileExistsError, and a run that found the
    private key could read signing.pub before it was written."""
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: real processes, like separate compiles
    barrier, results = ctx.Barrier(FIRST_RUNS), ctx.Queue()
    procs = [ctx.Process(target=_first_run, args=(barrier, results)) for _ in range(FIRST_RUNS)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [o for o in outcomes if o[0] != "ok"] == []
    priv, pub = default_key_paths()
    assert {o[1] for o in outcomes} == {str(priv)}
    assert {o[2] for o in outcomes} == {o[3] for o in outcomes} == {pub.read_bytes()}  # one pair, matching halves
    assert sum(o[4] for o in outcomes) == 1  # created once, and said once
    assert (priv.stat().st_mode & 0o777) == 0o600 and (pub.stat().st_mode & 0o777) == 0o644
    names = os.listdir(priv.parent)
    assert {"signing.pem", "signing.pub"} <= set(names) and not [n for n in names if "tmp" in n]  # no temp file left


def test_a_private_key_left_without_its_public_half_gets_it_back(kolm_home):
    """A pair an interrupted older kolm left half-written (it wrote the private key first)."""
    priv = ensure_default_key()
    _, pub = default_key_paths()
    expected = pub.read_bytes()
    pub.unlink()
    said = []
    assert ensure_default_key(said.append) == priv
    assert pub.read_bytes() == expected and said == []  # the same pair, not a new key


def test_a_public_key_left_without_its_private_half_is_replaced_by_a_whole_pair(kolm_home):
    """A crash between the two renames leaves only the public half: nothing was signed with it."""
    priv, pub = default_key_paths()
    ensure_default_key()
    priv.unlink()
    said = []
    assert ensure_default_key(said.append) == priv and len(said) == 1
    assert KeySigner(priv).public_pem() == pub.read_bytes()
