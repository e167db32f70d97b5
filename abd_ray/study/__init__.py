"""Studies: the one package of abd-ray that imports ray and optuna.

The flow of a study, module by module: ``spec`` (a study file -> :class:`StudySpec`, the trials it plans; checked by
``validate``), ``folder`` (the study folder: its files, state, lock and spec), ``preflight`` (everything a study can
be refused for, before Ray starts), ``runner`` (launch and resume), ``teachers`` (the teacher stage), ``tuner`` (the
Tune experiment: plan, Tuner, trials read back), ``search`` (search spaces and the study's searcher), ``trainable``
(one trial on the KD engine), ``callbacks`` (MLflow child runs from the driver, the progress table), ``sync`` (the
idempotent trial-to-MLflow sync), ``reconcile`` (the parent run, and Tune, Optuna and MLflow agreeing at the end),
``front`` and ``report`` (Pareto fronts, tables, plots), ``status`` (where a study stands, without Ray).
Submodules are imported on use so that ``abd-ray list`` stays fast.
"""
