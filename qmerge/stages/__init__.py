"""One module per pipeline stage; `STAGES` is the DAG in run order."""
