"""Running the real tools as child processes and reading their consoles: shared by the demo and the studies."""
