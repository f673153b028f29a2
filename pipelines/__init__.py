"""One module per DVC stage, the params schema and the stage runner."""
