"""Glue for training frameworks that keep their own accumulation knob and call ``optimizer.step()`` once per window.

Each module imports its framework lazily at import time of that module only; ``fusedaccum`` itself never imports
them (they are optional extras: ``pip install fusedaccum[integrations]``).
"""
