"""Launchers: what starts the workers of ``ablate run`` / ``ablate search``.

A launcher never changes what a worker does: local processes (:mod:`ablate.runner`) and the
tasks of a Slurm job array (:mod:`ablate.launch.slurm`) run the same worker loop around the
same ledger, MLflow store and checkpoint folder.

- :mod:`ablate.launch.settings`  Slurm settings from a cluster profile and ``--slurm KEY=VALUE``
- :mod:`ablate.launch.placement` where tasks may land; refuse stores they could not share, before submitting
- :mod:`ablate.launch.jobs`      the Slurm jobs of a spec: recorded in its ledger, asked of Slurm, cancelled
- :mod:`ablate.launch.slurm`     submission through submitit, and the array task's worker
"""
