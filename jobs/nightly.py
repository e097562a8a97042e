"""Nightly compiles as a Ray job: for each spec in a folder, compile, compare with the released
version, publish behind a canary if the gate passed and the compare recommends it.

    ray job submit --working-dir . -- python jobs/nightly.py specs/ [--key PUB]

Exits 1 if any spec failed to compile or publish (a failed gate or a compare that holds is not
a failure: the released version keeps serving). No logic of its own: kolm_ray.publish.nightly.
"""

import argparse
import sys
from pathlib import Path

from kolm_ray.errors import KolmError
from kolm_ray.home import state_dir
from kolm_ray.publish.nightly import load_specs, run_nightly
from kolm_ray.signing import Trust, default_trust

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("specs", type=Path)
    ap.add_argument("--key", type=Path, help="public key the artifacts are signed with [default: kolm's own]")
    a = ap.parse_args()
    try:
        load_specs(a.specs)  # every spec checked before anything runs
        results = run_nightly(a.specs, state_dir(), Trust(public_key=a.key) if a.key else default_trust())
    except KolmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    sys.exit(1 if any(r.outcome == "failed" for r in results) else 0)
