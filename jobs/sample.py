"""`ray job submit` entrypoint for the sampling half of a compile; no logic of its own.

    ray job submit --working-dir . -- python jobs/sample.py TASK --examples ex.jsonl --k 4
"""

import sys

from kolm_ray.cli import cli

if __name__ == "__main__":
    cli(["sample", *sys.argv[1:]], prog_name="jobs/sample.py")
