"""The job: what runs on the GPU machine. `python -m job check|prepare|train|evaluate|predict`.

Never imports sky. Talks to the launcher only through `contracts` (config, events, manifest).
"""
