"""The cluster fault suite (issue 11): real node processes, fault proxies on every
replication link, a nemesis, a workload recording a history, a checker and a report.

Modules: ``harness`` (cluster + modes), ``proxy``, ``nemesis``, ``workload``, ``checker``,
``report``, ``run`` (one run end to end; ``scripts/chaos.sh``).
"""
