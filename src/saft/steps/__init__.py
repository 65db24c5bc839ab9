"""Pipeline steps with explicit file inputs and outputs, shared by the CLI and orchestration."""
