"""What every layer above runs on: devices and placement, batched running, multi-process jobs,
crash-safe files and TOML configuration. Imports nothing else of jaxprobe but `errors`."""
