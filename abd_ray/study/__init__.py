"""Studies: the one package of abd-ray that imports ray and optuna.

``spec`` (study files, validated before anything starts), ``search`` (search spaces and the study's searcher),
``trainable`` (one trial on the KD engine), ``callbacks`` (MLflow child runs from the driver), ``runner`` (launch,
resume, teacher stage, reconciliation) and ``report`` (Pareto fronts, tables, plots). Submodules are imported on
use so that ``abd-ray list`` stays fast.
"""
