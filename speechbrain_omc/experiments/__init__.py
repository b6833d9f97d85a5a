"""Experiments that reproduce the paper's tables on the bundled corpus:
:mod:`.grid` (the cells), :mod:`.runner` (runs over seeds, resumably),
:mod:`.report` (table and figure), :mod:`.paper_table` and :mod:`.ablation`
(the command lines), and :mod:`.main_job` (the README's main job).
"""
