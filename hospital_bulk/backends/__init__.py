"""Backends: where the shared parts keep their state.

One module per kind of backend, each implementing the Protocols of `hospital_bulk.protocols`
and passing the same contract tests:

- `hospital_bulk.backends.memory`: everything in the memory of one process (the default;
  also what tests use).
- `hospital_bulk.backends.redis`: everything in Redis, shared by every process that uses the
  same database and key prefix (the ``redis`` extra).

Import the module you need; this package imports none of them, so a backend's dependencies are
only needed when it is used.
"""
