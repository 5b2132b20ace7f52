"""Generic routes any server can host (version, env, log levels, metrics, threads, periodic
threads); discovered like the package's own `*_api` modules, minus `app.COMMON_SKIP`."""
