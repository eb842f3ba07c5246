"""`python -m avflow.export`: training checkpoints -> self-contained inference model directories."""
