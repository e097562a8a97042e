"""The sampling half of a compile: teacher prompts, k-sampled teacher calls fanned out on
Ray Data, a response cache, a cluster-wide teacher quota, and best-of-k selection.

Pipeline (``fanout.sample``): rows -> expand k requests -> cache or teacher call (under the
shared quota, with retries) -> verifier T/C/L per sample -> best sample per row -> Parquet.
"""
