"""The planner: per-GPU memory and step time of training layouts, from sizes alone.

``estimate`` models one layout, ``search.plan`` checks and ranks layouts, ``hardware``
holds each GPU kind's declared and fitted constants, ``published`` the runs the model is
validated against, ``report`` the table and the ``--json`` fields; ``mtnlg plan`` is the
command line (``cli``).
"""
