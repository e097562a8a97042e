"""`ray job submit` entrypoint for a whole compile; takes `kolm compile`'s arguments, no logic of its own.

    ray job submit --working-dir . -- python jobs/compile.py TASK --examples ex.jsonl --eval holdout.jsonl \\
        --base qwen-2.5-3b-instruct --gate K=88
    ray job submit --working-dir . -- python jobs/compile.py --config examples/routing/compile.yaml
"""

import sys

from kolm_ray.cli import cli

if __name__ == "__main__":
    cli(["compile", *sys.argv[1:]], prog_name="jobs/compile.py")
