"""The research studies (not part of the dmsteps package): run each from the repository root as
``python -m studies.NAME`` (``python -m studies.study --help``); studies/README.md lists them and
docs/research/README.md the reports they write."""
