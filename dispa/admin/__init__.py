"""The master's admin HTTP API (:mod:`.api`): health, metrics, status, config, log level."""
