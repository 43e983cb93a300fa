"""tocsin's process: configuration, wiring, lifecycle and the command line."""
