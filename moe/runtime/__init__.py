"""Where code runs and what it says while it runs: devices and dtypes, progress and logs, memory probes."""
