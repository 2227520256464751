"""The evaluation suite's analysis side: continual-learning tables and figures built from run directories.

``tables`` turns one run directory (the contract in ``docs/run_outputs.md``) into three tidy tables and
merges many runs into the suite tables; ``plots`` draws the suite figures from those tables; ``cli`` holds
the ``run-metrics``, ``merge`` and ``plots`` commands that the Snakemake rules call. Nothing here trains or
knows about Snakemake.
"""
