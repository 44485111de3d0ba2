"""Team mode without Docker: `supervisor` starts, checks and stops the stack's local processes."""
