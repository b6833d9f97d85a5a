"""Experiments that reproduce the paper's tables on the bundled corpus.

* :mod:`.grid`: the configurations (cells) of the paper table and the
  settings of their federated runs;
* :mod:`.runner`: runs a grid's cells over seeds, two processes at a time,
  resumably;
* :mod:`.report`: the table (Markdown, CSV) and its figure;
* :mod:`.paper_table`: the command line,
  ``python -m speechbrain_omc.experiments.paper_table``.
"""
