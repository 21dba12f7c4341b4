"""The three contracts between the launcher (local) and the job (remote).

- `contracts.config`: the run config (YAML or seed-style JSON), one typed schema.
- `contracts.events`: the event stream, JSON lines the job appends and the launcher renders.
- `contracts.manifest`: the artifacts manifest, every output file with its size and sha256.

Nothing here imports torch or sky: both sides import these modules.
"""
