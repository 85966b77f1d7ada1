"""The demo over training seeds, as tools/demo_seeds.py --write-spread last measured it (written by that
tool; do not edit). ``SPREAD``: ``settings`` (settings_fingerprint() of the demo measured), ``seeds``,
``date``, ``processes``, ``minutes`` / ``cpu_minutes`` (min, max wall / CPU minutes), ``all_three``
({sampling: [min, max]} share of samples with colour, shape and position right).
"""
SPREAD = {
 "settings": "08763ea63ca9",
 "seeds": [
  0,
  1,
  2
 ],
 "date": "2026-12-07",
 "processes": 2,
 "minutes": [
  26.461851894866687,
  26.65645304223332
 ],
 "cpu_minutes": [
  8.82798624855,
  9.010763747783335
 ],
 "all_three": {
  "DDPM 25, guidance 2 (report)": [
   0.845,
   0.93
  ],
  "DDPM 25, guidance 1 (report)": [
   0.85,
   0.92
  ],
  "DPMSolverMultistep 30, guidance 1": [
   0.745,
   0.9
  ],
  "DPMSolverMultistep 30, guidance 2": [
   0.85,
   0.865
  ],
  "DPMSolverMultistep 30, guidance 4": [
   0.795,
   0.82
  ]
 },
 "steps": 30
}
