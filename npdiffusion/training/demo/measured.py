"""The demo over training seeds, as tools/demo_seeds.py --write-spread last measured it (written by that tool; do not edit).

``SPREAD``: ``settings`` (settings_fingerprint() of the demo measured), ``seeds``, ``date``, ``processes``, ``minutes`` (min, max wall), ``all_three`` ({sampling: [min, max]} share of samples with colour, shape and position right).
"""
SPREAD = {}
