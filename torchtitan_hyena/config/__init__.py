from torchtitan_hyena.config.job_config import JobConfig
from torchtitan_hyena.config.manager import ConfigManager, config_table

__all__ = ["ConfigManager", "JobConfig", "config_table"]
