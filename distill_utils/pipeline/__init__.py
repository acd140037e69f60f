"""The stages the quick start, the ablation and the studies share, run through the scripts' flags.

``settings``  the quick start's settings and the real-data recipes (``STAMPS``, ``OPENCLIPART``)
``scripts``   the scripts' entry points, handed in by the orchestrating script
``stages``    data, the pretrained encoder, experts, shortcuts, one distillation, its evaluation
``sweep``     a plan of runs (methods x budgets x seeds): their flags, reuse by fingerprint, their students
``reports``   the tables, plots and report folders of a sweep
"""
