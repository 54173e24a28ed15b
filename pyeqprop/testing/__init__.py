"""Test support for pyeqprop: independent oracles, hypothesis strategies and tolerance checks.

``oracles`` imports nothing from pyeqprop, so the reference tests compare the library with
code it does not share. ``strategies`` needs hypothesis (a test dependency); it is not
imported here so that ``pyeqprop.testing.oracles`` and ``checks`` work without it.
"""
