"""The remote backend's settings under their earlier import path; they live in `nnsight_jupyter.settings`."""

from ..settings import CONFIG, ENV_API_KEY, ENV_HOST, RemoteConfig, config_file

__all__ = ["CONFIG", "ENV_API_KEY", "ENV_HOST", "RemoteConfig", "config_file"]
