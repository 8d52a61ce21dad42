"""The Flower ServerApp of a federated DiPro run.

``app`` is what ``flwr run .`` starts: it composes ``configs/federated.yaml`` with the Hydra
overrides of the run config (``[tool.flwr.app.config] overrides``, or ``flwr run . --run-config
'overrides="task=mortality federated.num_rounds=5"'``) and runs ``federated.server.run_server``.
``server_app_for(cfg)`` is the same app bound to an already resolved config (the Python entry).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from federated.config import compose_config, overrides_from_run_config
from federated.server import run_server

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Compose the run's config from its Flower run config and run it."""
    run_server(grid, compose_config(overrides_from_run_config(context.run_config)))


def server_app_for(cfg: Mapping[str, Any]) -> ServerApp:
    """A ServerApp that runs the resolved config ``cfg``."""
    bound = ServerApp()

    @bound.main()
    def bound_main(grid: Grid, context: Context) -> None:
        run_server(grid, cfg)

    return bound
