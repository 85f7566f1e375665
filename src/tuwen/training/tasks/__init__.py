"""One module per task the shared trainer runs: what to build, what data to read, what loss to minimise."""
