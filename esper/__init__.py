"""Esper: grow neural networks while they train.

Subpackages, lowest first: ``leyline`` (contracts), ``kasmina`` (batched mechanics),
``tamiyo`` (decisions), ``simic`` (learning), ``nissa`` (telemetry), ``tasks`` (data).
"""

__version__ = "0.1.0"
