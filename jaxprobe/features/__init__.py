"""Features on disk and in memory: `Captures` (what a capture returns: {site: array} that knows its
timesteps, steps, reductions, prompts and options, and splits itself into feature sets for every
consumer), the crash-safe feature store, cached extraction shared by the studies, and the settings
(model, sampling, run) every study's config composes."""
