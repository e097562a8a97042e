"""Test infrastructure that ships with the package: a local HTTP server speaking the Anthropic
Messages API (``messages_api``) and seeded synthetic task corpora (``corpus``).

Used by the test suite, the benchmarks and the offline examples; never by a compile against
a real teacher. Nothing here may be imported by the library's own pipeline modules.
"""
