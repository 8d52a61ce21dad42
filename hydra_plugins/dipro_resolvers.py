"""Hydra's hook into the project: registers the configs' own OmegaConf resolvers
(``dipro.config.register_resolvers``) before Hydra composes a config.

Hydra imports every module of the ``hydra_plugins`` namespace package when it starts (under
``@hydra.main`` and the compose API alike) and asks each search-path plugin to adjust the config
search path before any config is read; this one leaves the path as it is and registers the
resolvers, so ``${dipro.cwd:}`` resolves in every entrypoint, test and ``--cfg job --resolve``.
"""

from __future__ import annotations

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class DiproResolvers(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        from dipro.config import register_resolvers

        register_resolvers()
