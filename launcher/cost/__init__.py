"""What a run will cost before it starts, by job: tokens.py (the tokens and steps), rates.py (throughput
per card, which cards fit), hours.py (the hours on one card, term by term), estimate.py (offers from
SkyPilot's catalog, the card table, the LONG RUN line), caps.py (--max-cost/--max-hours -> the remote
deadline, the actual cost), render.py (tables and JSON). Nothing here imports torch or sky."""
