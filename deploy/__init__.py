"""Operator and device-owner commands for a real (non-simulated) fedgraft federation.

    python -m deploy.superlink --help    # operator: TLS, SuperLink, node registration, runs
    python -m deploy.device --help       # device owner: key pair, SuperNode

Both wrap Flower 1.42's own executables (``flower-superlink``, ``flower-supernode``, ``flwr``) with
the settings this project needs; see docs/deployment.md. ``deploy.flower`` is the process kit they
share with the simulation runner (``simulations.run``). Neither the ServerApp nor the ClientApp
imports this package.
"""
