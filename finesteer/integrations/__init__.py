"""Integrations of FineSteer with model libraries.

:mod:`finesteer.integrations.hf` steers HuggingFace ``transformers`` models
(:class:`~finesteer.integrations.hf.FusedSteerer`, :func:`~finesteer.integrations.hf.find_decoder_layers`).
``transformers`` is an optional dependency (``pip install finesteer[hf]``); nothing here imports it
until a model is actually handled.
"""
