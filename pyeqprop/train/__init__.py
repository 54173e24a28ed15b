"""The training application: optimizer, schedules and checkpoints (SPEC.md §8), built on the library.

The library (``pyeqprop.model``, ``pyeqprop.ops``) never imports this package.
"""
