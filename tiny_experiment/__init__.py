"""
Adamba's whole pipeline at toy scale on a CPU: `python -m tiny_experiment` (see __main__.py).
tasks.py (synthetic task mix, splits, scoring), pipeline.py (the training stages), evaluate.py
(held-out evaluation with nanochat.engine), report.py (targets, table, plots).
"""
