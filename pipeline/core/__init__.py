"""The bottom layer: what every other layer may import, and which imports nothing above it.

Modules:
    errors       exceptions carrying the CLI's exit code and a message fit for users.
    files        atomic writes, checksums, NIfTI read/write.
    paths        path relations checked before a stage reads or writes (``is_inside``).
    seeds        seeds as named streams (``stream_seed``, ``stream_rng``).
    progress     progress of the long stages; stage modules only, never compute modules.
    section      the config section base class, its digest and flat form.
    torch_state  torch thread count and global RNG, given back after a stage.

Nothing here knows about stages, contracts or MLflow (``lint-imports`` checks it).
"""
