"""Importers: other libraries' checkpoints -> difftime run directories."""
