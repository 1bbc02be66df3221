"""Operator tools over the round ledger: the ``fedgraft-ops`` command line and the web dashboard.

Everything here only reads: the ledger is always opened with ``read_only=True``, so neither tool
can change a run's record, even by accident, and both can watch a ledger a server is writing.
"""
