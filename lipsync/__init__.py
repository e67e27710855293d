"""Command-line entry points and orchestration (`lipsync up`, `lipsync bench`)."""
