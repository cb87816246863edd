"""The embedded demo: a small assistant model trained by the project, and ``finesteer demo``.

- :mod:`finesteer.demo.corpus` — the templated, seeded corpus and the disjoint prompt splits;
- :mod:`finesteer.demo.train` — ``python -m finesteer.demo.train`` rebuilds ``model/``;
- :mod:`finesteer.demo.pipeline` — fit SCS + MoSE on the model and measure steered generation;
- :mod:`finesteer.demo.cli` — the ``finesteer demo`` subcommand.
"""
