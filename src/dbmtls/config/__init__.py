"""Configuration: typed models (model.py), loading and merging (load.py), Istio mapping."""

from dbmtls.config.load import load_config
from dbmtls.config.model import Config, DatabaseConfig, TLSSettings

__all__ = ["Config", "DatabaseConfig", "TLSSettings", "load_config"]
