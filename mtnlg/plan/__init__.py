"""The planner: per-GPU memory and step time of training layouts, from sizes alone.

``estimate`` models one layout, ``search.plan`` ranks every valid one, ``hardware`` holds
the declared constants of each GPU kind; ``mtnlg plan`` is the command line.
"""
