"""The MP cache engine: registered KV contexts, sessions, lookup and store/retrieve."""
