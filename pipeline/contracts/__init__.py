"""What crosses a stage boundary, one module per artifact, used by its writer and its readers alike.

Modules:
    dataset     a dataset folder and its ``manifest.csv``.
    model       ``MODEL_DIR/model.json`` (``ModelMeta``), written by train, read by every later stage.
    report      ``REPORT_DIR/report.json`` (``Report``), written by evaluate, read by export, run and the CLI.
    stages      a run root's layout, ``stages.json``, and what every stage returns.
    synthetic   the markers export writes into synthetic files, which the leak audit recognises.

Contracts sit above :mod:`pipeline.core` and below everything else (``lint-imports`` checks it);
``docs/contracts.md`` describes the files.
"""
