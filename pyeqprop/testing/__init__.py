"""Test support for pyeqprop: independent oracles, hypothesis strategies, the rounding-error model and tolerance checks.

``oracles`` imports nothing from pyeqprop, so the reference tests compare the library with
code it does not share. ``strategies`` needs hypothesis (a test dependency); it is not
imported here so that ``pyeqprop.testing.oracles``, ``rounding`` and ``checks`` work without it.
"""
