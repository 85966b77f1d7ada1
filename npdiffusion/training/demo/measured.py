"""The demo over training seeds, as tools/demo_seeds.py --write-spread last measured it (written by that
tool; do not edit). ``SPREAD``: ``settings`` (settings_fingerprint() of the demo measured), ``seeds``,
``date``, ``processes``, ``minutes`` / ``cpu_minutes`` (min, max wall / CPU minutes), ``all_three``
({sampling: [min, max]} share of samples with colour, shape and position right).
"""
SPREAD = {
 "settings": "bb9fdec10449",
 "seeds": [
  0,
  1,
  2
 ],
 "date": "2026-12-07",
 "processes": 2,
 "minutes": [
  4.385579977233344,
  5.838185287766646
 ],
 "cpu_minutes": [
  7.409333534966665,
  7.690382471216666
 ],
 "all_three": {
  "DDPM 25, guidance 2 (report)": [
   1.0,
   1.0
  ],
  "DDPM 25, guidance 1 (report)": [
   0.985,
   1.0
  ],
  "DPMSolverMultistep 30, guidance 1": [
   0.975,
   1.0
  ],
  "DPMSolverMultistep 30, guidance 2": [
   1.0,
   1.0
  ],
  "DPMSolverMultistep 30, guidance 4": [
   0.97,
   0.995
  ]
 },
 "steps": 30
}
