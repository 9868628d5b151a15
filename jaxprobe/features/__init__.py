"""Features on disk and in memory: the crash-safe feature store, cached extraction shared by the
studies, and the settings (model, sampling, run) every study's config composes."""
