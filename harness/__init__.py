"""The harness tests and benchmarks share: real servers as processes (Redis, the
services, Chroma, PostgreSQL, containers, browsers), the launched stack, recordings,
labelled sets and the grammar fuzzer. Not installed with Baton and not in its images."""
