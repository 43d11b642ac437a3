"""Scaling-law sweeps (paper section 4.2): definitions, 6ND FLOPs, the runner, fits and reports.

    flops.py   C = 6 N D as the paper counts it (footnote 15), N and D from a run's config
    sweep.py   a sweep definition (experiments/scaling.py: points, metrics, thresholds)
    runner.py  runs the points here one after another (resumable) or one job each via launch/
    fit.py     log-log least squares with t intervals, the parity FLOP ratio (Table 3)
    report.py  collects the points' evals, writes the Figure 5-style plot and Table 3-style table

The command line is transfusion_jax/sweep.py (python -m transfusion_jax.sweep).
"""
