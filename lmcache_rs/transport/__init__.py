"""The ZMQ ROUTER server: the only code that touches the engine socket."""
