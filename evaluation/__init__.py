"""The paper's metrics for generated pairs and for a distilled student.

metrics.py (per-pair values), evaluator.py (a run's pairs through the metric models and the student),
report.py (table, JSON, case grids), job.py (what `python evaluate.py` does, for a composed config).
"""
